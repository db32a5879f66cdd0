"""Validation accuracy against training time: the paper's trade-off, per method.

Reads each training run's `validation.parquet` (step, training wall time so far, accuracy),
averages the runs of a method over seeds, plots accuracy against training time and against
optimizer steps (one line per method, the spread over seeds shaded), and measures how long
each method takes to reach a share of the best method's final validation accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from apo.io import atomic_path
from apo.job import output_name, read_stage_parquet
from apo.methods import METHODS, REFERENCE

FRACTIONS = (0.95, 1.0)


def display_names() -> dict[str, str]:
    """{method: display name}, in registry order (read when needed: a method registered late counts)."""
    return {m.name: m.display for m in METHODS.values()}


def load(trainings: list[dict]) -> pd.DataFrame:
    """One row per validation of every run: label, method, seed, step, optimizer_steps (up to
    that step), train_time_s, accuracy. Runs without validation add no rows."""
    frames = []
    for t in trainings:
        path = Path(t["dir"]) / output_name("train", "validation")
        if not path.exists():
            continue
        v = read_stage_parquet(path)
        if v.empty:
            continue
        m = read_stage_parquet(Path(t["dir"]) / output_name("train", "metrics"))
        done = dict(zip(m["step"], m["optimizer_steps"].cumsum())) if "optimizer_steps" in m else {}
        v = v.assign(label=t["label"], method=t.get("method", t["label"]), seed=t.get("seed", 0),
                     optimizer_steps=v["step"].map(lambda s: done.get(s, 0)))
        frames.append(v[["label", "method", "seed", "step", "optimizer_steps", "train_time_s", "accuracy"]])
    cols = ["label", "method", "seed", "step", "optimizer_steps", "train_time_s", "accuracy"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per method and validation step: the mean over seeds of accuracy, training time and
    optimizer steps, and the lowest and highest accuracy of its seeds."""
    g = curves.groupby(["method", "step"], sort=False)
    out = g.agg(accuracy=("accuracy", "mean"), low=("accuracy", "min"), high=("accuracy", "max"),
                train_time_s=("train_time_s", "mean"), optimizer_steps=("optimizer_steps", "mean"),
                seeds=("seed", "nunique"))
    return out.reset_index().sort_values(["method", "step"], kind="stable")


def time_to_reach(curve: pd.DataFrame, target: float) -> float:
    """Training time of the first validation at or above `target` (NaN: never reached). Read
    off the validations, so it is the time of the first one after the crossing, not an
    interpolation between them."""
    hit = curve[curve["accuracy"] >= target - 1e-12]
    return float(hit["train_time_s"].iloc[0]) if len(hit) else float("nan")


def time_to_accuracy(curves: pd.DataFrame, fractions=FRACTIONS) -> pd.DataFrame:
    """Per method (mean over seeds): final and best validation accuracy, and for each X in
    `fractions` the training time to reach X x the best method's final validation accuracy
    and its ratio to A*-PO's time (NaN where either did not reach it)."""
    means = mean_curves(curves)
    final = means.groupby("method", sort=False)["accuracy"].last()
    best_final = final.max()
    rows = {}
    for method, curve in means.groupby("method", sort=False):
        row = {"final_accuracy": final[method], "best_accuracy": curve["accuracy"].max(),
               "train_time_s": curve["train_time_s"].iloc[-1]}
        for x in fractions:
            row[f"time_to_{round(100 * x)}_s"] = time_to_reach(curve, x * best_final)
        rows[method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    for x in fractions:
        col = f"time_to_{round(100 * x)}_s"
        base = table[col].get(REFERENCE, float("nan"))
        # A*-PO there at step 0 (the reference already is): no ratio to divide by
        table[f"ratio_{round(100 * x)}"] = table[col] / base if base > 0 else float("nan")
    names = display_names()
    order = [m for m in names if m in table.index] + sorted(set(table.index) - set(names))
    table = table.loc[order]
    table.attrs["target_method"] = final.idxmax() if len(final) else None
    table.attrs["best_final"] = best_final
    return table


def markdown(table: pd.DataFrame) -> str:
    """Accuracy in %, times in minutes, 'not reached' where a method never got there."""
    names = display_names()
    shown = pd.DataFrame(index=[names.get(m, m) for m in table.index])
    shown.index.name = "method"
    shown["final val. acc. (%)"] = [f"{100 * v:.2f}" for v in table["final_accuracy"]]
    shown["best val. acc. (%)"] = [f"{100 * v:.2f}" for v in table["best_accuracy"]]
    shown["training time (min)"] = [f"{v / 60:.2f}" for v in table["train_time_s"]]
    for col in [c for c in table.columns if c.startswith("time_to_")]:
        x = col.split("_")[2]
        shown[f"time to {x} % (min)"] = ["not reached" if pd.isna(v) else f"{v / 60:.2f}" for v in table[col]]
        shown[f"/ A*-PO ({x} %)"] = ["–" if pd.isna(v) else f"{v:.2f}" for v in table[f"ratio_{x}"]]
    return shown.to_markdown(disable_numparse=True)


def _time_unit(seconds: float) -> tuple[float, str]:
    return (3600.0, "h") if seconds > 2 * 3600 else (60.0, "min")


def plot(curves: pd.DataFrame, x: str, path: Path, title: str) -> None:
    """Validation accuracy (%) against `x` (train_time_s or optimizer_steps): one line per
    method through its mean over seeds, the seeds' range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    means = mean_curves(curves) if len(curves) else curves
    scale, unit = _time_unit(means[x].max() if len(means) else 0.0) if x == "train_time_s" else (1.0, "")
    for method, c in means.groupby("method", sort=False):
        xs = c[x] / scale
        (line,) = ax.plot(xs, 100 * c["accuracy"], marker="o", markersize=4, linewidth=2,
                          label=display_names().get(method, method))
        if c["seeds"].max() > 1:
            ax.fill_between(xs, 100 * c["low"], 100 * c["high"], color=line.get_color(), alpha=0.2, linewidth=0)
    if not len(means):
        ax.text(0.5, 0.5, "no validation during training", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"training wall time ({unit})" if x == "train_time_s" else "optimizer steps")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(bottom=0)  # an accuracy axis that starts at zero does not exaggerate gaps
    if x != "train_time_s":
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if len(means):
        ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
