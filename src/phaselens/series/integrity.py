"""Which revisions of an imported series hold the same weights (torch-free; the hashes come from `series.revisions`).

Public series can serve one model under many revision names (EleutherAI/pythia #205: 76 of
pythia-2.8b's 154 step branches equal `main`). Each revision's content hash is kept in run.json
(`imported.weights_sha256`, step -> SHA-256), and every group of revisions with one hash is
listed under `imported.identical` with the revision they all equal (the group's last step):
the CLI, the report and `Run.identical_steps()` read it, and the transition detector leaves
those steps out, since their curves are flat by construction.
"""

from __future__ import annotations

from typing import Any, Sequence

from phaselens.store.run_dir import RunDir


def identical_groups(hashes: dict[int, str]) -> list[dict[str, Any]]:
    """Groups of two or more steps with the same hash: [{"steps": [...], "same_as": last step}], by first step."""
    by_hash: dict[str, list[int]] = {}
    for step, digest in sorted(hashes.items()):
        by_hash.setdefault(digest, []).append(step)
    groups = [{"steps": steps, "same_as": steps[-1]} for steps in by_hash.values() if len(steps) > 1]
    return sorted(groups, key=lambda group: group["steps"][0])


def describe_group(group: dict[str, Any], all_steps: Sequence[int]) -> str:
    """'steps 33000–143000: identical weights to step 143000; their curves are flat by construction'.

    Runs of consecutive checkpoints (in the run's own order) are written as ranges.
    """
    members = set(group["steps"])
    runs: list[list[int]] = []
    previous_in = False
    for step in sorted(set(all_steps) | members):
        if step in members:
            if previous_in:
                runs[-1].append(step)
            else:
                runs.append([step])
        previous_in = step in members
    spans = ", ".join(f"{run[0]}–{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"steps {spans}: identical weights to step {group['same_as']}; their curves are flat by construction"


def identical_steps(info: dict[str, Any]) -> dict[int, int]:
    """step -> the step whose weights it repeats, for every duplicate (not the step they all equal) of a run.json."""
    duplicates = {}
    for group in (info.get("imported") or {}).get("identical", []):
        for step in group["steps"]:
            if step != group["same_as"]:
                duplicates[int(step)] = int(group["same_as"])
    return duplicates


def identical_texts(info: dict[str, Any], all_steps: Sequence[int]) -> list[str]:
    """One sentence per group of identical revisions recorded in a run.json."""
    return [describe_group(group, all_steps) for group in (info.get("imported") or {}).get("identical", [])]


def record_hashes(run_dir: RunDir, hashes: dict[int, str]) -> list[str]:
    """Merge `hashes` (step -> content hash) into run.json, regroup the identical revisions, and describe them."""
    info = run_dir.read()
    imported = dict(info.get("imported") or {})
    stored = {int(step): digest for step, digest in (imported.get("weights_sha256") or {}).items()}
    stored.update(hashes)
    imported["weights_sha256"] = {str(step): stored[step] for step in sorted(stored)}
    imported["identical"] = identical_groups(stored)
    run_dir.update(imported=imported)
    return identical_texts({"imported": imported}, run_dir.checkpoint_steps())
