"""Long jobs show progress where stdout is not a terminal (a log file, a pipe, CI): plain lines while they run."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

from phaselens.progress import LOG_SECONDS, ProgressLog

LINE = re.compile(r"^train (\S+) (\d+)/(\d+) steps(?: loss \S+)? (?:\S+ steps/s|\S+ s per step) (?:eta|done in) \d+:\d\d")


def test_a_piped_train_prints_progress_lines_while_it_trains(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "phaselens.cli", "train", "induction", "train.steps=30", "train.checkpoint_every=10",
               "telemetry.every=10", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, while_running = [], []
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        seen.append(line)
        match = LINE.match(line)
        if match and 0 < int(match[2]) < int(match[3]):
            # the line came out while the run was still training: the trainer marks run.json finished at its end
            while_running.append(json.loads((out / "run.json").read_text())["status"] == "running")
    assert proc.wait(timeout=300) == 0, "\n".join(seen)
    steps = [int(m[2]) for line in seen if (m := LINE.match(line))]
    assert while_running and all(while_running), "\n".join(seen)
    assert steps == sorted(steps) and steps[-1] == 30, "\n".join(seen)
    assert seen[0] == "train induction 0/30 steps"  # the job announces itself before its first step
    assert not any("━" in line for line in seen)  # no bar drawn into a log


def test_log_lines_come_each_tenth_or_every_few_seconds_with_rate_and_eta():
    clock = [0.0]
    stream = io.StringIO()
    log = ProgressLog("probe run", 40, "checkpoints", stream=stream, now=lambda: clock[0])
    for _ in range(40):  # 1 s per checkpoint: a tenth (4 checkpoints) comes before LOG_SECONDS
        clock[0] += 1.0
        log.update(advance=1)
    log.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "probe run 0/40 checkpoints"
    assert lines[1] == "probe run 4/40 checkpoints 1 checkpoints/s eta 0:36"
    assert lines[-1] == "probe run 40/40 checkpoints 1 checkpoints/s done in 0:40"
    assert len(lines) == 11

    clock[0], stream = 0.0, io.StringIO()
    log = ProgressLog("llc-calibrate step 100", 1000, "SGLD steps, 4×4 chains", stream=stream, now=lambda: clock[0])
    for done in range(1, 60):  # slow: one step in 1/4 of LOG_SECONDS, so lines come by time, not by share
        clock[0] += LOG_SECONDS / 4
        log.update(completed=done)
    lines = stream.getvalue().splitlines()
    assert lines[1] == f"llc-calibrate step 100 4/1000 SGLD steps, 4×4 chains {LOG_SECONDS / 4:.3g} s per SGLD step eta 41:30"
    assert len(lines) == 1 + 59 // 4  # one every LOG_SECONDS


def test_a_resumed_job_counts_its_rate_from_where_it_resumed():
    clock = [0.0]
    stream = io.StringIO()
    log = ProgressLog("train demo", 3000, completed=2000, field="loss", stream=stream, now=lambda: clock[0])
    clock[0] = 20.0
    log.update(completed=2500, value="0.412")
    assert stream.getvalue().splitlines() == ["train demo 2000/3000 steps", "train demo 2500/3000 steps loss 0.412 25 steps/s eta 0:20"]
