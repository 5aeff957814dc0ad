"""The docs cannot drift from the code: every block a user would run is run by a test.

Convention: the line `<!-- run by tests/test_NAME.py -->` just before a ```python or ```bash block in
README.md or docs/**/*.md names the test that extracts the block from the page (by a marker string in
it) and runs it, with fewer steps where training is involved. This file checks the convention on every
page, runs the blocks it is named for (each page's blocks in order, in a fresh directory, commands
through the real CLI with the shrinking rules below) and holds the README to a front page.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
THIS = "tests/test_docs.py"
BLOCK = re.compile(r"(?:^<!-- run by (?P<test>tests/test_\w+\.py) -->\n)?^```(?P<lang>python|bash)\n(?P<body>.*?)^```",
                   flags=re.M | re.S)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def blocks(page: Path) -> list[tuple[str | None, str, str]]:
    """(test, language, code) of every ```python / ```bash block of a page, in order."""
    return [(m.group("test"), m.group("lang"), m.group("body")) for m in BLOCK.finditer(page.read_text())]


def page_block(page: str, marker: str, language: str = "python") -> str:
    """The block of `page` (relative to the repository) that contains `marker`: what a test runs."""
    return next(code for _, lang, code in blocks(ROOT / page) if lang == language and marker in code)


# --- the convention, on every page --------------------------------------------------------------------------------

def test_every_runnable_block_names_a_test_that_exists_and_reads_its_page():
    problems = []
    for page in pages():
        rel = page.relative_to(ROOT).as_posix()
        for test, lang, code in blocks(page):
            first = code.strip().splitlines()[0] if code.strip() else ""
            if test is None:
                problems.append(f"{rel}: ```{lang} block `{first}` has no `<!-- run by tests/test_NAME.py -->` line")
            elif not (ROOT / test).is_file():
                problems.append(f"{rel}: block `{first}` names {test}, which does not exist")
            elif page.name not in (ROOT / test).read_text():
                problems.append(f"{rel}: {test} never mentions {page.name}, so it cannot read the block `{first}`")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_page_that_links_every_tutorial():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000, f"README.md is {len(readme)} characters; the front page keeps to 12,000"
    links = set(re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme))
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((DOCS / "tutorials").glob("*.md"))
               if p.relative_to(ROOT).as_posix() not in links]
    assert not missing, f"README.md links no tutorial page {missing}"
    broken = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not broken, f"README.md links files that do not exist: {broken}"


def test_no_machine_load_or_lab_notebook_lines_in_hand_written_prose():
    """Measured figures come from benchmarks/results/ at build time; prose says what holds on any machine."""
    pattern = re.compile(r"load average (of |at )?\d|\bat load \d|\(load \d|on this machine[^.]*\d+(\.\d+)? ?(s|ms|%)\b")
    hits = [f"{p.relative_to(ROOT)}: {line.strip()[:100]}" for p in pages() for line in p.read_text().splitlines()
            if pattern.search(line)]
    assert not hits, "\n".join(hits)


def test_every_nav_entry_is_a_page_or_one_a_later_change_adds():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    hooks = _load_hook("nav")
    kept = hooks.existing(config["nav"], DOCS)

    def targets(entries):
        for entry in entries:
            (_, target), = entry.items()
            yield from (targets(target) if isinstance(target, list) else [target])

    assert all((DOCS / t).is_file() for t in targets(kept))
    assert {"index.md", "getting-started.md", "reference/cli.md", "benchmarks.md"} <= set(targets(kept))


# --- generated reference pages ------------------------------------------------------------------------------------

def _load_hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_generated_from_every_command_and_option_of_the_typer_app():
    import typer.main

    from phaselens.cli import app

    group = typer.main.get_command(app)
    text = _load_hook("cli_reference").command_sections(group)
    for name, command in group.commands.items():
        assert f"## `phaselens {name}`" in text
        for param in command.params:
            opts = getattr(param, "opts", [])
            assert any(f"{opt}" in text for opt in opts) or param.param_type_name == "argument", (name, opts)
    assert "--probe-option" in text and "--revisions" in text


def test_benchmark_tables_come_from_recorded_results_with_their_machine_and_load(tmp_path):
    """record.py runs a benchmark script, keeps its last JSON line with provenance; the hook renders it."""
    spec = importlib.util.spec_from_file_location("bench_record", ROOT / "benchmarks" / "record.py")
    record = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "tiny.py").write_text("import json, sys\nprint('warming up')\n"
                                   "print(json.dumps({'benchmark': 'tiny', 'ratio': 1.25, 'args': sys.argv[1:]}))\n")
    path = record.record("tiny", ["--steps", "3"], bench_dir=bench, results_dir=tmp_path / "results")
    entry = json.loads(path.read_text())
    assert entry["result"] == {"benchmark": "tiny", "ratio": 1.25, "args": ["--steps", "3"]}
    assert entry["cores"] == os.cpu_count() and entry["cpu"] and len(entry["load_before"]) == 3
    table = _load_hook("benchmarks").result_table("tiny", tmp_path / "results")
    assert "| `ratio` | 1.25 |" in table and entry["date"] in table and entry["cpu"] in table and "load" in table
    assert "Not recorded yet" in _load_hook("benchmarks").result_table("missing", tmp_path / "results")
    (bench / "broken.py").write_text("print('no json here')\n")
    with pytest.raises(SystemExit, match="not JSON"):
        record.record("broken", [], bench_dir=bench, results_dir=tmp_path / "results")
    with pytest.raises(SystemExit, match="no benchmark 'nope'"):
        record.record("nope", [], bench_dir=bench, results_dir=tmp_path / "results")


def test_committed_benchmark_results_name_their_date_machine_and_load():
    results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert results, "benchmarks/results/ holds no recorded benchmark"
    for path in results:
        entry = json.loads(path.read_text())
        assert {"date", "cpu", "cores", "load_before", "load_after", "result"} <= set(entry), path.name
        assert entry["result"].get("benchmark") == path.stem


# --- running the blocks this file is named for ---------------------------------------------------------------------

SMALL_TRAIN = {"train.steps": "4", "train.checkpoint_every": "2", "train.eval_every": "2"}


def shrink(args: list[str]) -> list[str]:
    """A documented `phaselens` command with fewer steps, tokens, chains or samples: the same code paths."""
    command, rest = args[0], args[1:]
    if command in ("train", "sweep"):
        kept = [a for a in rest if a.split("=", 1)[0] not in SMALL_TRAIN]
        return [command, *kept, *(f"{k}={v}" for k, v in SMALL_TRAIN.items())]
    if command == "demo":
        return [command, *rest, "--steps", "20"]
    if command == "neurons":
        return [command, *rest, "--tokens", "2048"]
    if command == "import-hf":
        return [command, *rest, "--sequences", "2"]
    if command == "llc-calibrate":
        rest = [a for i, a in enumerate(rest) if a != "--step" and (i == 0 or rest[i - 1] != "--step")]
        return [command, *rest, "--epsilons", "1e-3", "--gammas", "100", *LLC_SMALL]
    if command == "probe" and any("llc" in a for a in rest):
        return [command, *rest, *LLC_SMALL]
    return args


LLC_SMALL = [x for o in ("llc.chains=1", "llc.draws=2", "llc.burnin=1", "llc.n=16") for x in ("--probe-option", o)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_briefly(args: list[str], cwd: Path) -> None:
    """`phaselens serve ...` as typed, on a free port: it must answer its run list, then it is stopped."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "phaselens.cli", *args, "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=2) as response:
                    runs = json.loads(response.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"`phaselens {' '.join(args)}` did not answer: {proc.stdout.read()}")
                time.sleep(0.3)
        assert runs, f"`phaselens {' '.join(args)}` serves no run"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run_shell_block(code: str, cwd: Path, recorded: Path | None = None) -> list[str]:
    """Run each command of a ```bash block in `cwd` (shrunk; `serve` briefly); returns the commands run."""
    from typer.testing import CliRunner

    from phaselens.cli import app

    ran = []
    for line in code.splitlines():
        line = line.split(" # ")[0].strip()
        if not line:
            continue
        args = shlex.split(line)
        if args[0] == "phaselens" and args[1] == "serve":
            serve_briefly(args[1:], cwd)
        elif args[0] == "phaselens":
            cwd_before = Path.cwd()
            os.chdir(cwd)
            try:
                result = CliRunner().invoke(app, shrink(args[1:]))
            finally:
                os.chdir(cwd_before)
            assert result.exit_code == 0, f"`{line}` failed:\n{result.output}"
        elif args[0] == ".venv/bin/python" and args[1] == "benchmarks/record.py":
            # the record step itself, on the benchmark's quickest settings, into a scratch results folder
            env = {**os.environ, "PHASELENS_BENCH_RESULTS": str(recorded or cwd / "results")}
            quick = {"telemetry_overhead": ["--steps", "4", "--block", "2"]}.get(args[2], [])
            proc = subprocess.run([sys.executable, str(ROOT / args[1]), args[2], *quick], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        else:
            raise AssertionError(f"no rule to run `{line}`")
        ran.append(line)
    return ran


def run_page(page: str, cwd: Path, namespace: dict | None = None, python_rewrites: dict | None = None) -> dict:
    """Run every block of `page` that names this file, in order, in `cwd`; returns the Python namespace."""
    namespace = {} if namespace is None else namespace
    here = Path.cwd()
    for test, lang, code in blocks(ROOT / page):
        if test != THIS:
            continue
        if lang == "bash":
            run_shell_block(code, cwd)
            continue
        for old, new in (python_rewrites or {}).items():
            code = code.replace(old, new)
        os.chdir(cwd)
        try:
            exec(compile(code, f"{page} block", "exec"), namespace)
        finally:
            os.chdir(here)
    return namespace


@pytest.fixture(scope="module")
def example_models(tmp_path_factory) -> Path:
    """models/tiny-gpt2 and models/tiny-neox, made by the docs' own example-models block."""
    cwd = tmp_path_factory.mktemp("example_models")
    os.chdir(cwd)
    try:
        exec(page_block("docs/tutorials/own-training-loop.md", "models/tiny-gpt2"), {})
    finally:
        os.chdir(ROOT)
    return cwd


def test_the_example_models_block_makes_the_models_the_docs_use(example_models):
    from transformer_lens.model_bridge import TransformerBridge

    for name in ("tiny-gpt2", "tiny-neox"):
        folder = example_models / "models" / name
        assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    bridge = TransformerBridge.boot_transformers(str(example_models / "models" / "tiny-neox"), device="cpu")
    assert bridge.cfg.n_layers == 2


def test_the_adapter_page_runs_on_an_example_model(example_models):
    namespace = run_page("docs/concepts/adapter.md", example_models)
    assert namespace["adapter"].n_layers == 2


@pytest.mark.slow
@pytest.mark.parametrize("page", ["docs/tutorials/induction.md", "docs/concepts/measurement-plan.md",
                                  "docs/tutorials/dashboard.md", "docs/tutorials/neurons-bdh.md",
                                  "docs/tutorials/grokking.md", "docs/tutorials/llc.md",
                                  "docs/tutorials/disambiguation.md", "docs/tutorials/geometry.md"])
def test_a_tutorial_runs_top_to_bottom_with_fewer_steps(page, example_models, tmp_path):
    shutil.copytree(example_models / "models", tmp_path / "models")
    rewrites = {'fixed=["data.k=10"]': 'fixed=["data.k=10", "train.steps=4", "train.checkpoint_every=2"]',
                'save_induction_series("models/neox-induction")': 'save_induction_series("models/neox-induction", steps=(0, 2, 4))',
                'save_toy_series("models/toy-series", text)': 'save_toy_series("models/toy-series", text, steps=(0, 2, 4))'}
    run_page(page, tmp_path, python_rewrites=rewrites)


def test_getting_started_shows_the_two_commands_the_readme_shows():
    """The same `make demo` / `make test` block on both pages (tests/test_readme.py runs the README's)."""
    assert page_block("docs/getting-started.md", "make demo", "bash") == page_block("README.md", "make demo", "bash")


@pytest.mark.slow  # mkdocs build (~10 s) and two pages in Chromium
def test_the_built_site_renders_its_landing_page_and_a_tutorial(browser, screenshots, tmp_path):
    """`mkdocs build --strict` (what `make docs` runs) passes, and its pages render with the nav and the code."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto((site / "index.html").as_uri())
    assert "phaselens" in page.title() and page.locator("nav").count() > 0
    assert page.locator("img[src*='dashboard_timeline']").evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=str(screenshots / "docs_landing.png"))
    page.goto((site / "tutorials" / "induction" / "index.html").as_uri())
    assert page.locator("h1").first.inner_text().startswith("Induction heads")
    assert page.locator("pre code").count() >= 3
    page.screenshot(path=str(screenshots / "docs_tutorial.png"))
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "phaselens probe" in cli and "--probe-option" in cli
    page.close()
