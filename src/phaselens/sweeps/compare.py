"""Compare runs: a table of hyperparameters and each run's headline, fitted on the study's own axes.

The runs' task declares its headline (`phaselens.tasks.study.Headline`: late disambiguation's τ, the
first step where the first-target loss is below 0.5·log K, with the steps of each diagnostic's
strongest transition) and the axes its question is asked on (there: D = n_unique_b·K and K).
`compare` fits log τ = a + Σ_i b_i log x_i jointly over the declared axes that vary between the runs,
with R², standard errors and the number of runs, and says when the grid cannot separate the axes
(collinear, or too few distinct points). Swept hyperparameters no axis covers (learning rate, batch
size) get a line log τ = a + b·log x each; when both the learning rate and the batch size vary, the
"SGD temperature" lr / batch size is fitted too.
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


COLLINEAR = 0.98  # |correlation| of two log axes above which their exponents cannot be told apart


@dataclass
class JointFit:
    """log y = intercept + Σ_i slopes[i]·log x_i over the runs that reached the headline, on the declared axes.

    `fixed` names the declared axes that did not vary (left out, with their one value); `problem` says why
    the grid cannot separate the axes (then `slopes` is empty), `warning` when it barely can.
    """

    metric: str
    axes: list[str]
    slopes: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # standard errors of the slopes (NaN with no residual freedom)
    intercept: float = math.nan
    r2: float = math.nan
    n: int = 0  # runs in the fit
    points: int = 0  # distinct axis points among them
    fixed: dict[str, float] = field(default_factory=dict)
    problem: str | None = None
    warning: str | None = None

    def text(self) -> str:
        held = "".join(f"; {name} fixed at {value:g}" for name, value in self.fixed.items())
        if self.problem:
            return f"no joint fit of log {self.metric} on {', '.join(self.axes) or 'the declared axes'}: {self.problem}{held}"
        terms = " · ".join(f"{axis}^{slope:.2f} (± {error:.2f})" for axis, slope, error in zip(self.axes, self.slopes, self.errors))
        text = f"{self.metric} ∝ {terms} (joint log–log fit, R² {self.r2:.3f}, {self.n} runs at {self.points} distinct points{held})"
        return text + (f"; {self.warning}" if self.warning else "")


def fit_joint(table: pd.DataFrame, metric: str, axes: list[str]) -> JointFit:
    """Least squares of log `metric` on [1, log x_1, …]: the declared axes that vary among the runs that reached it."""
    y = _numeric(table[metric]) if metric in table else np.full(len(table), np.nan)
    xs = {axis: _numeric(table[axis]) for axis in axes}
    keep = np.isfinite(y) & (y > 0)
    for x in xs.values():
        keep &= np.isfinite(x) & (x > 0)
    fit = JointFit(metric, [], n=int(keep.sum()))
    varying = []
    for axis, x in xs.items():
        values = np.unique(x[keep])
        if len(values) == 1:
            fit.fixed[axis] = float(values[0])
        elif len(values) > 1:
            varying.append(axis)
    fit.axes = varying
    if fit.n == 0:
        fit.problem = f"no run reached {metric}"
        return fit
    if not varying:
        fit.problem = "no declared axis varies between the runs that reached it"
        return fit
    X = np.column_stack([np.ones(fit.n)] + [np.log(xs[axis][keep]) for axis in varying])  # (n, 1 + p)
    Y = np.log(y[keep])
    fit.points = len(np.unique(X, axis=0))
    if np.linalg.matrix_rank(X) < X.shape[1]:
        why = (f"{fit.points} distinct points for {X.shape[1]} coefficients" if fit.points < X.shape[1]
               else "they are collinear on these runs (one is a fixed function of the others)")
        fit.problem = (f"the grid cannot separate {' and '.join(varying)}: {why}; vary them independently, "
                       f"e.g. one fixed with several values of the other, and the other way round")
        return fit
    coef, *_ = np.linalg.lstsq(X, Y, rcond=None)
    residual = Y - X @ coef
    total = float(((Y - Y.mean()) ** 2).sum())
    fit.intercept, fit.slopes = float(coef[0]), [float(c) for c in coef[1:]]
    fit.r2 = 1 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    freedom = fit.points - X.shape[1]
    if freedom > 0:
        sigma2 = float((residual ** 2).sum()) / (fit.n - X.shape[1])
        fit.errors = [float(e) for e in np.sqrt(np.diag(sigma2 * np.linalg.inv(X.T @ X)))[1:]]
    else:
        fit.errors = [math.nan] * len(varying)
        fit.warning = (f"too few distinct points: {fit.points} points for {X.shape[1]} coefficients, so the fit is exact "
                       "and says nothing about its error; add grid points")
    if len(varying) > 1:
        corr = np.corrcoef(X[:, 1:].T)
        worst = np.abs(corr[np.triu_indices(len(varying), 1)]).max()
        if worst > COLLINEAR:
            fit.warning = ((fit.warning + "; ") if fit.warning else "") + (
                f"the axes are nearly collinear on this grid (|correlation| {worst:.3f} of their logs): the exponents trade off, read the ±")
    return fit


@dataclass
class Comparison:
    table: pd.DataFrame  # one row per run: run, swept hyperparameters, declared axes, headline columns (tau, ...)
    swept: list[str]
    fits: list[Fit] = field(default_factory=list)  # swept keys no declared axis covers, each alone
    files: dict[str, Path] = field(default_factory=dict)
    joint: JointFit | None = None  # the fit on the study's declared axes
    headline: object | None = None  # the runs' `Headline` (None: their task declares none)

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
    """Hyperparameters, the declared axes and the headline columns (τ, plateau, transition steps) of one run."""
    from phaselens.analysis.headlines import headline_values
    from phaselens.run import open_run

    run = open_run(path)
    flat = _flatten(run.config)
    row: dict[str, object] = {"run": run.name, "path": str(path), "status": run.status}
    row.update({key: flat.get(key) for key in swept})
    headline = run_headline(run)
    if headline is not None:
        row.update({axis.name: axis.value(flat) for axis in headline.axes})
        row.update(headline_values(headline.name, run))
    return row


def run_headline(run):
    """The headline the run's task declares (None: it declares none, or the task is not registered here)."""
    from phaselens.errors import ConfigError

    try:
        return run.study.headline
    except ConfigError:
        return None


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


def temperature(table: pd.DataFrame) -> np.ndarray:
    """The SGD temperature lr / batch size of each run; NaN for a full-batch run (`train.batch_size=0`),
    whose batch is the whole training split and not a number in the table."""
    batch = _numeric(table["train.batch_size"])
    return np.where(batch > 0, _numeric(table["train.lr"]) / np.where(batch > 0, batch, 1.0), np.nan)


def compare_runs(paths: list[Path | str], out: Path | str | None = None) -> Comparison:
    """Compare runs (or sweep directories); writes compare.csv, compare.md and the fit figures into `out`.

    `out` defaults to the sweep directory when one is given, else to ./compare.
    """
    runs = expand_runs(paths)
    sweep_dir = Path(paths[0]) if len(paths) == 1 and not RunDir(paths[0]).exists() else None
    sweep_file = sweep_dir / "sweep.json" if sweep_dir is not None else None
    from phaselens.run import open_run

    opened = [open_run(p) for p in runs]
    raw = [run.config for run in opened]
    headlines = {repr(run_headline(run)): run_headline(run) for run in opened}
    if len(headlines) > 1:
        tasks = sorted({run.task for run in opened})
        raise RunError(f"these runs belong to different studies (tasks {', '.join(tasks)}); compare the runs of one study")
    headline = next(iter(headlines.values()))
    swept = _swept_keys([_flatten(c) for c in raw], sweep_file)
    table = pd.DataFrame([run_row(p, swept) for p in runs])
    comparison = Comparison(table, swept, headline=headline)
    if headline is not None:
        covered = {key for axis in headline.axes for key in axis.keys}
        if headline.axes:
            comparison.joint = fit_joint(table, headline.metric, [axis.name for axis in headline.axes])
        values = _numeric(table[headline.metric]) if headline.metric in table else np.full(len(table), np.nan)
        for key in swept:
            if key in table and key not in covered:
                fit = fit_log_log(_numeric(table[key]), values, key)
                if fit is not None:
                    comparison.fits.append(fit)
        if "train.lr" in swept and "train.batch_size" in swept and not covered & {"train.lr", "train.batch_size"}:
            fit = fit_log_log(temperature(table), values, TEMPERATURE)
            if fit is not None:
                comparison.fits.append(fit)
    out = Path(out) if out is not None else (sweep_dir if sweep_dir is not None else Path("compare"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        comparison.files["csv"] = out / "compare.csv"
        table.to_csv(comparison.files["csv"], index=False)
        if comparison.joint is not None and comparison.joint.slopes:
            comparison.files["axes_figure"] = plot_axis_fits(table, comparison.joint, out / "tau_axes.png")
        if headline is not None:
            figure = plot_tau_fits(table, comparison.fits, [k for k in swept if k not in covered], out / "tau_fit.png", headline.metric)
            if figure is not None:
                comparison.files["figure"] = figure
        comparison.files["markdown"] = out / "compare.md"
        comparison.files["markdown"].write_text(compare_markdown(comparison))
    except OSError as exc:
        raise RunError(f"cannot write the comparison into --out {out}: {exc.strerror or exc}") from exc
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
    headline = comparison.headline
    intro = (f"{headline.description}; `step_*` = the step of each diagnostic's strongest transition (– where none was "
             "found or it was not measured)." if headline is not None and headline.description else "")
    text = ["# phaselens compare", "", intro, "", comparison.markdown(), ""]
    if headline is None:
        return "\n".join(text + ["The runs' task declares no headline, so there is nothing to fit.", ""])
    if comparison.joint is not None:
        text += [f"## Joint fit on the study's axes", "", axes_text(headline),
                 "", "log " + headline.metric + " = a + Σ_i b_i · log x_i, least squares over the runs that reached it:", "",
                 f"- {comparison.joint.text()}", ""]
        if "axes_figure" in comparison.files:
            text += [f"![{headline.metric} against each axis]({comparison.files['axes_figure'].name})", ""]
    if comparison.fits:
        text += ["## Log–log fits (swept keys no axis covers, each alone)", ""] + [f"- {fit.text()}" for fit in comparison.fits] + [""]
        if "figure" in comparison.files:
            text += [f"![τ fits]({comparison.files['figure'].name})", ""]
    elif comparison.joint is None:
        text += ["No log–log fit: fewer than two runs with different values of a swept hyperparameter reached τ.", ""]
    return "\n".join(text)


def axes_text(headline) -> str:
    parts = []
    for axis in headline.axes:
        formula = "·".join(axis.times) + ("/" + "·".join(axis.over) if axis.over else "")
        parts.append(f"`{axis.name}` = {formula}" + (f" ({axis.description})" if axis.description else ""))
    return "Axes the study declares: " + "; ".join(parts) + "."


def plot_axis_fits(table: pd.DataFrame, fit: JointFit, path: Path) -> Path:
    """The metric against each fitted axis on log–log axes, runs coloured by the other axes' values, with the joint fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = _numeric(table[fit.metric])
    xs = {axis: _numeric(table[axis]) for axis in fit.axes}
    keep = np.isfinite(y) & (y > 0)
    for x in xs.values():
        keep &= np.isfinite(x) & (x > 0)
    fig, axes = plt.subplots(1, len(fit.axes), figsize=(4.8 * len(fit.axes), 4), squeeze=False)
    for i, (ax, axis) in enumerate(zip(axes[0], fit.axes)):
        others = [a for a in fit.axes if a != axis]
        groups = sorted({tuple(float(xs[o][r]) for o in others) for r in np.flatnonzero(keep)})
        colors = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, max(2, len(groups))))
        for color, group in zip(colors, groups):
            rows = keep.copy()
            for other, value in zip(others, group):
                rows &= xs[other] == value
            label = ", ".join(f"{o}={v:g}" for o, v in zip(others, group)) or "runs"
            ax.scatter(xs[axis][rows], y[rows], color=color, zorder=3, label=label)
            span = np.geomspace(xs[axis][keep].min(), xs[axis][keep].max(), 50)
            line = fit.intercept + fit.slopes[i] * np.log(span)
            line += sum(fit.slopes[fit.axes.index(o)] * math.log(v) for o, v in zip(others, group))
            ax.plot(span, np.exp(line), color=color, lw=1.0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
        for scale in (ax.xaxis, ax.yaxis):
            scale.set_major_formatter(plain)
            scale.set_minor_formatter(plain)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"{fit.metric} (steps)")
        ax.set_title(f"{fit.metric} ∝ {axis}^{fit.slopes[i]:.2f}" + (" (others marked)" if others else ""), fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"joint fit: R² {fit.r2:.3f}, {fit.n} runs" + (f"; {', '.join(f'{k} = {v:g}' for k, v in fit.fixed.items())}" if fit.fixed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tau_fits(table: pd.DataFrame, fits: list[Fit], swept: list[str], path: Path, metric: str = "tau") -> Path | None:
    """τ against each swept hyperparameter on log–log axes, with the fitted line; None when nothing to draw."""
    keys = [fit.key for fit in fits] or [k for k in swept if k in table]
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {fit.key: fit for fit in fits}
    taus = _numeric(table[metric])
    if not (taus > 0).any():  # no run reached τ: nothing to put on log axes
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.8 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x = temperature(table) if key == TEMPERATURE else _numeric(table[key])
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
