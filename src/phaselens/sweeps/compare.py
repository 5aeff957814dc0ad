"""Compare runs: a table of hyperparameters and transition steps, and τ against the swept hyperparameter.

τ is the first step where the first-target loss is below 0.5·log K (see `analysis.disambiguation`);
the other columns are the steps of each diagnostic's strongest transition. For each swept numeric
hyperparameter a least-squares line log τ = a + b·log x gives the scaling exponent b (slope) and R².
When both the learning rate and the batch size vary, the "SGD temperature" lr / batch size is fitted too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from phaselens.errors import RunError
from phaselens.store.run_dir import RunDir

IGNORED_KEYS = ("name",)
TEMPERATURE = "train.lr/train.batch_size"


@dataclass
class Fit:
    """log τ = intercept + slope · log x over the runs that reached τ."""

    key: str
    slope: float
    intercept: float
    r2: float
    n: int

    def text(self) -> str:
        base = f"({self.key})" if "/" in self.key else self.key
        return f"τ ∝ {base}^{self.slope:.2f} (log–log slope {self.slope:.3f}, R² {self.r2:.3f}, {self.n} runs)"


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run: run, swept hyperparameters, k, tau, <diagnostic> steps
    swept: list[str]
    fits: list[Fit] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def markdown(self) -> str:
        return markdown_table(self.table)


def expand_runs(paths: list[Path | str]) -> list[Path]:
    """Run directories from run paths and sweep directories (every run directly inside one)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if RunDir(path).exists():
            runs.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if RunDir(p).exists()) if path.is_dir() else []
        if not inside:
            raise RunError(f"{path} is neither a run (no run.json) nor a sweep directory with runs in it")
        runs += inside
    return runs


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            flat[prefix + key] = ",".join(map(str, value))
        else:
            flat[prefix + key] = value
    return flat


def _swept_keys(configs: list[dict[str, object]], sweep_file: Path | None) -> list[str]:
    if sweep_file is not None and sweep_file.is_file():
        from phaselens.sweeps.grid import axis_keys

        return axis_keys([tuple(axis) for axis in json.loads(sweep_file.read_text())["axes"] if len(axis[1]) > 1])
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if k not in IGNORED_KEYS and len({str(c.get(k)) for c in configs}) > 1]


def run_row(path: Path, swept: list[str]) -> dict[str, object]:
    """Hyperparameters, τ, plateau and diagnostic transition steps of one run."""
    from phaselens.analysis.disambiguation import DIAGNOSTICS, alignment, plateau, tau
    from phaselens.run import open_run

    run = open_run(path)
    flat = _flatten(run.config)
    metrics = run.metrics()
    k = int(flat.get("data.k", 0) or 0)
    row: dict[str, object] = {"run": run.name, "path": str(path), "status": run.status}
    row.update({key: flat.get(key) for key in swept})
    found_plateau = plateau(metrics, k)
    row.update({"data.k": k, "tau": tau(metrics, k),
                "plateau_steps": found_plateau.steps if found_plateau else None,
                "plateau_level": found_plateau.level if found_plateau else None})
    steps = {r["metric"] if r["probe"] == "loss" else r["probe"]: r["step"] for r in alignment(metrics).rows}
    for _, probe, metric in DIAGNOSTICS:
        name = metric if probe == "loss" else probe
        row[f"step_{name}"] = steps.get(name)
    return row


def fit_log_log(x: np.ndarray, y: np.ndarray, key: str) -> Fit | None:
    """Least squares of log y on log x; None with fewer than two distinct positive x."""
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = np.log(x[keep]), np.log(y[keep])
    if len(np.unique(x)) < 2:
        return None
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return Fit(key, float(slope), float(intercept), r2, int(len(x)))


def _numeric(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def compare_runs(paths: list[Path | str], out: Path | str | None = None) -> Comparison:
    """Compare runs (or sweep directories); writes compare.csv, compare.md and tau_fit.png into `out`.

    `out` defaults to the sweep directory when one is given, else to ./compare.
    """
    runs = expand_runs(paths)
    sweep_dir = Path(paths[0]) if len(paths) == 1 and not RunDir(paths[0]).exists() else None
    sweep_file = sweep_dir / "sweep.json" if sweep_dir is not None else None
    from phaselens.run import open_run

    configs = [_flatten(open_run(p).config) for p in runs]
    swept = _swept_keys(configs, sweep_file)
    table = pd.DataFrame([run_row(p, swept) for p in runs])
    fits = []
    taus = _numeric(table["tau"])
    for key in swept:
        if key in table:
            fit = fit_log_log(_numeric(table[key]), taus, key)
            if fit is not None:
                fits.append(fit)
    if "train.lr" in swept and "train.batch_size" in swept:
        temperature = _numeric(table["train.lr"]) / _numeric(table["train.batch_size"])
        fit = fit_log_log(temperature, taus, TEMPERATURE)
        if fit is not None:
            fits.append(fit)
    comparison = Comparison(table, swept, fits)
    out = Path(out) if out is not None else (sweep_dir if sweep_dir is not None else Path("compare"))
    out.mkdir(parents=True, exist_ok=True)
    comparison.files["csv"] = out / "compare.csv"
    table.to_csv(comparison.files["csv"], index=False)
    comparison.files["markdown"] = out / "compare.md"
    comparison.files["markdown"].write_text(compare_markdown(comparison))
    figure = plot_tau_fits(table, fits, swept, out / "tau_fit.png")
    if figure is not None:
        comparison.files["figure"] = figure
    return comparison


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    columns = [c for c in table.columns if c != "path"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for record in table[columns].astype(object).itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in record) + " |")
    return "\n".join(lines)


def compare_markdown(comparison: Comparison) -> str:
    text = ["# phaselens compare", "",
            "τ = first step where the first-target loss is below 0.5·log K; `step_*` = the step of each "
            "diagnostic's strongest transition (– where none was found or it was not measured).", "",
            comparison.markdown(), ""]
    if comparison.fits:
        text += ["## Log–log fits", ""] + [f"- {fit.text()}" for fit in comparison.fits] + [""]
        if "figure" in comparison.files:
            text += [f"![τ fits]({comparison.files['figure'].name})", ""]
    else:
        text += ["No log–log fit: fewer than two runs with different values of a swept hyperparameter reached τ.", ""]
    return "\n".join(text)


def plot_tau_fits(table: pd.DataFrame, fits: list[Fit], swept: list[str], path: Path) -> Path | None:
    """τ against each swept hyperparameter on log–log axes, with the fitted line; None when nothing to draw."""
    keys = [fit.key for fit in fits] or [k for k in swept if k in table]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {fit.key: fit for fit in fits}
    taus = _numeric(table["tau"])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x = (_numeric(table["train.lr"]) / _numeric(table["train.batch_size"]) if key == TEMPERATURE
             else _numeric(table[key]))
        ax.scatter(x, taus, color="tab:blue", zorder=3)
        fit = by_key.get(key)
        if fit is not None:
            xs = np.geomspace(np.nanmin(x[x > 0]), np.nanmax(x), 50)
            ax.plot(xs, np.exp(fit.intercept) * xs ** fit.slope, color="tab:red", lw=1.2,
                    label=f"slope {fit.slope:.2f}, R² {fit.r2:.2f}")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("τ (steps)")
        ax.set_title(f"τ vs {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
