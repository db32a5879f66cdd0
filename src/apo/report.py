"""The experiment's readable entry: results/<experiment>/.

Writes `summary.csv` (one row per benchmark x model), `report.md` (the same as a table, the
paper's method comparison, training summaries and the stage directories used),
`paper_table.csv` and `paper_table.tex` (the comparison: accuracy, time, memory, ratios), `training_curves.png`,
`validation_time.png` and `validation_steps.png` (validation accuracy against training time and
steps), `time_to_accuracy.csv`, and `stages/`, relative symlinks to every hashed stage directory
the experiment used.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from apo import curves, sweep
from apo.io import atomic_path, write_json, write_text
from apo.job import output_name, read_stage_json, read_stage_parquet
from apo.methods import REFERENCE

CURVES = [
    ("reward", "mean reward (on-policy samples)"),
    ("loss", "loss"),
    ("kl", "KL to reference (nats, summed)"),
    ("response_length", "response length (tokens)"),
    ("logprob_gap_mean", "engine vs trainer log-prob gap (mean |diff|)"),
]


def summary_table(evals: list[dict]) -> pd.DataFrame:
    rows = []
    for e in evals:
        s = read_stage_json(Path(e["dir"]) / output_name("evaluate", "scores"))
        rows.append(
            {
                "benchmark": e["benchmark"],
                "model": e["model"],
                "accuracy": round(100 * s["accuracy"], 2),
                "n": s["n"],
                "n_rows": s["n_rows"],
                "n_counted": s["n_counted"],
                "scored": f"{s['n']}/{s['n_rows']}",
                "k": s["k"],
                "temperature": s["temperature"],
                "top_p": s["top_p"],
                "max_new_tokens": s["max_new_tokens"],
                "unparsed": s["unparsed"],
                "eval_dir": e["dir"],
            }
        )
    return pd.DataFrame(rows)


def eval_label(row) -> str:
    """A benchmark's column header with the settings its numbers were measured with and the
    rows it scored of the benchmark's rows (n / N)."""
    how = "greedy" if row["temperature"] == 0 else f"T {row['temperature']:g}, top-p {row['top_p']:g}"
    return f"{row['benchmark']} (avg@{row['k']}, {how}, {row['max_new_tokens']} tokens, {row['scored']} rows)"


def with_settings(table: pd.DataFrame) -> pd.DataFrame:
    """The summary table with each benchmark named together with its evaluation settings, so
    that every accuracy shown carries k, temperature, top_p, max tokens and n / N rows."""
    return table.assign(benchmark=table.apply(eval_label, axis=1)) if len(table) else table


def subset_warnings(table: pd.DataFrame) -> list[str]:
    """A warning for each benchmark scored on fewer rows than it has: published numbers score
    every row, so these are not comparable with them."""
    lines = []
    for r in table.drop_duplicates("benchmark").itertuples():
        if r.n != r.n_rows:
            lines.append(f"- **Warning**: {r.benchmark} scored {r.n} of its {r.n_rows} rows; the accuracy "
                         f"is over {r.n_counted} (rows an explicit setting of it excludes are left out, "
                         "unscorable golds count as wrong unless `evaluate.unscorable: exclude`).")
    return lines + [""] if lines else []


# Every file `write` puts in results/<experiment>/: the report rule declares these as its
# outputs (tests/test_report.py checks the two agree) and `apo report` logs them to MLflow.
FILES = ["report.md", "summary.csv", "paper_table.csv", "paper_table.tex", "training_curves.png",
         "training_phases.png", "validation_time.png", "validation_steps.png", "time_to_accuracy.csv"]


def method_names() -> dict[str, str]:
    """Row order and display names of the paper's table (Lee et al. 2025, Tables 1-2): the
    reference model, then every registered method."""
    return {"reference": "reference", **curves.display_names()}


def paper_table(accuracy: pd.DataFrame, trainings: list[dict]) -> pd.DataFrame:
    """The paper's comparison: one row per method, columns = benchmarks (accuracy %), their
    average, training hours, peak memory (GB) and the time and memory ratios to A*-PO.

    accuracy: rows of (benchmark, model, accuracy) where model is a training label or
    "reference". trainings: one dict per training run with label, method, seed,
    train_time_s and peak_memory_mb (from its summary.json). A method trained with several
    seeds gets the mean over seeds of each number (`seeds` says how many); the reference
    model has no training cost. Ratios are NaN when A*-PO was not trained.
    """
    method_of = {t["label"]: t["method"] for t in trainings}
    benches = list(dict.fromkeys(accuracy["benchmark"]))
    acc = accuracy.assign(method=accuracy["model"].map(lambda m: method_of.get(m, m)))
    table = acc.pivot_table(index="method", columns="benchmark", values="accuracy", aggfunc="mean")[benches]
    table["average"] = table[benches].mean(axis=1)
    runs = pd.DataFrame(trainings, columns=["label", "method", "seed", "train_time_s", "peak_memory_mb"])
    cost = runs.groupby("method").agg(
        seeds=("seed", "nunique"), train_time_s=("train_time_s", "mean"), peak_memory_mb=("peak_memory_mb", "mean"))
    table["seeds"] = cost["seeds"].reindex(table.index).astype("Int64")
    table["train_hours"] = cost["train_time_s"] / 3600
    table["peak_memory_gb"] = cost["peak_memory_mb"] / 1024
    base = cost.loc[REFERENCE] if REFERENCE in cost.index else pd.Series({"train_time_s": float("nan"), "peak_memory_mb": float("nan")})
    table["time_ratio"] = cost["train_time_s"] / base["train_time_s"]
    table["memory_ratio"] = cost["peak_memory_mb"] / base["peak_memory_mb"]
    names = method_names()
    order = [m for m in names if m in table.index] + sorted(set(table.index) - set(names))
    table = table.loc[order].rename(index=names)
    table.index.name = "method"
    table.columns.name = None
    return table


def paper_table_markdown(table: pd.DataFrame) -> str:
    """Two decimals, and an en dash where a number does not apply (the reference's cost)."""
    shown = table.astype(object).map(lambda v: "–" if pd.isna(v) else f"{v:.2f}")
    if "seeds" in table:
        shown["seeds"] = table["seeds"].map(lambda v: "–" if pd.isna(v) else str(int(v)))
    return shown.to_markdown(disable_numparse=True)  # keep the two decimals


def paper_table_latex(table: pd.DataFrame) -> str:
    """The same table as a LaTeX tabular (booktabs rules), two decimals, '--' for n/a."""
    return table.to_latex(float_format="%.2f", na_rep="--", escape=True)


# Phases of an optimizer step, as the trainer times them (metrics.parquet columns).
PHASES = [
    ("time_generate_s", "generation"),
    ("time_grade_s", "grading"),
    ("time_ref_logprobs_s", "reference log-probs"),
    ("time_old_logprobs_s", "pi_old log-probs"),
    ("time_values_s", "critic values"),
    ("time_update_s", "update"),
    ("time_sync_s", "weight sync"),
]


def phase_times(trainings: list[dict]) -> pd.DataFrame:
    """Seconds each training run spent in each phase, summed over its optimizer steps
    (rows = run label, columns = phase; a phase a run does not time counts 0)."""
    rows = {}
    for t in trainings:
        m = read_stage_parquet(Path(t["dir"]) / output_name("train", "metrics"))
        rows[t["label"]] = {name: float(m[col].sum()) if col in m else 0.0 for col, name in PHASES}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[name for _, name in PHASES])


def plot_phases(phases: pd.DataFrame, path: Path) -> None:
    """One horizontal bar per run, split into the phases of its training time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(phases) + 1.4))
    (phases / 60).plot.barh(stacked=True, ax=ax, width=0.6)
    ax.invert_yaxis()  # first run on top, as in the tables
    ax.set_xlabel("training wall time (min)")
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_curves(trainings: list[dict], path: Path, smooth: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for t in trainings:
        m = read_stage_parquet(Path(t["dir"]) / output_name("train", "metrics"))
        for ax, (col, title) in zip(axes, CURVES):
            if col not in m:  # a run from before the metric was logged
                continue
            (line,) = ax.plot(m["step"], m[col], alpha=0.25)
            ax.plot(m["step"], m[col].rolling(smooth, min_periods=1).mean(), color=line.get_color(), label=t["label"])
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def validation_markdown(validation: dict | None, tta: pd.DataFrame | None) -> list[str]:
    """The report's section on validation during training: the set, whether it is held out,
    the two plots and the time-to-accuracy table."""
    lines = ["## Validation during training", ""]
    if not validation or tta is None or tta.empty:
        return lines + ["No validation set (`data.validation`): no accuracy-against-time curves.", ""]
    scored = ("greedily" if validation.get("temperature", 0.0) == 0 and validation.get("k", 1) == 1
              else f"as avg@{validation['k']} at temperature {validation['temperature']:g}")
    lines.append(f"Validation set: `{validation['dataset']}`, scored {scored} (`train.validation`); its "
                 "time is not counted as training time.")
    if validation.get("on_benchmark"):
        lines += ["", "**The validation set is not held out from the test benchmarks** "
                  "(`data.validation_on_benchmark: true`, as the authors validate on the MATH test "
                  "set, which holds MATH500): a choice made by validation accuracy is made on test problems."]
    best = curves.display_names().get(tta.attrs.get("target_method"), tta.attrs.get("target_method"))
    lines += ["", "![validation accuracy against training time](validation_time.png)",
              "![validation accuracy against optimizer steps](validation_steps.png)", "",
              f"Training time until the mean validation accuracy (over seeds) first reaches X % of the "
              f"best method's final validation accuracy ({best}: {100 * tta.attrs['best_final']:.2f} %), "
              "read at the validations (so an upper bound), and its ratio to A*-PO's; also in "
              "`time_to_accuracy.csv`:", "", curves.markdown(tta), ""]
    return lines


def sweep_markdown(runs: list[dict]) -> list[str]:
    """The report's section on sweeps: every run of each method's grid, its final validation
    accuracy and training time, and the pick."""
    if not runs:
        return []
    rows = []
    for r in runs:
        v = read_stage_parquet(Path(r["dir"]) / output_name("train", "validation")).sort_values("step").iloc[-1]
        rows.append({"method": method_names().get(r["method"], r["method"]),
                     **{k: sweep.value_text(val) for k, val in r["combo"].items()},
                     "final val. acc. (%)": f"{100 * v['accuracy']:.2f}",
                     "training time (min)": f"{v['train_time_s'] / 60:.2f}",
                     "picked": "yes" if r["picked"] else ""})
    table = pd.DataFrame(rows).fillna("–")
    return ["## Sweep", "",
            "Each method trained once per combination of the listed settings on the first seed; its "
            "pick (the best final validation accuracy, never a benchmark's) is the run trained on "
            "the other seeds and evaluated above.", "",
            table.to_markdown(index=False, disable_numparse=True), ""]


def gap_markdown(trainings: list[dict]) -> list[str]:
    """The report's section on the train-inference gap: per run, the mean and the largest
    |log pi_engine(y_t) - log pi_trainer(y_t)| over the sampled tokens of all its steps."""
    rows = []
    for t in trainings:
        s = read_stage_json(Path(t["dir"]) / output_name("train", "summary"))
        if s.get("logprob_gap_mean") is not None:
            rows.append({"run": t["label"], "mean": f"{s['logprob_gap_mean']:.2e}", "max": f"{s['logprob_gap_max']:.2e}"})
    if not rows:
        return []
    return ["## Train-inference gap", "",
            "How far the generation engine's log-probs of the sampled tokens are from the trainer's "
            "(pi_old, or the policy before the update), in nats per token, over every step "
            "(`logprob_gap_mean` and `logprob_gap_max` in each run's metrics.parquet):", "",
            pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True), ""]


def markdown(experiment: str, table: pd.DataFrame, trainings: list[dict], stages: dict,
             paper: pd.DataFrame | None = None, phases: pd.DataFrame | None = None,
             validation: list[str] | None = None) -> str:
    lines = [f"# Experiment `{experiment}`", "", "## Accuracy (pass@1 = avg@k, %)", ""]
    pivot = with_settings(table).pivot(index="model", columns="benchmark", values="accuracy")
    lines += [pivot.to_markdown(), ""] + subset_warnings(table)
    if paper is not None:
        lines += [
            "## Methods compared (as in the paper's tables)", "",
            paper_table_markdown(paper), "",
            "Accuracy in %, the mean over seeds, each benchmark with its evaluation settings "
            "(k samples per problem, temperature, top-p, max new tokens); training hours = the "
            "summed wall time of the optimizer steps (generation, grading, reference log-probs, "
            "critic values, update, weight sync; stage 1 not included); peak memory = "
            "the CUDA allocator's peak on GPU, the process's peak resident memory on CPU; "
            "ratios divide by A*-PO's. Also in `paper_table.csv` and `paper_table.tex`.", "",
        ]
    settings = table.drop_duplicates(["benchmark", "model"])[
        ["benchmark", "model", "scored", "n_counted", "k", "temperature", "top_p", "max_new_tokens", "unparsed"]
    ]
    lines += ["Sampling settings and counts (scored = rows scored / rows of the benchmark; n_counted = "
              "the rows the accuracy is over; unparsed = responses graded 0 because no answer "
              "could be extracted, the grader timed out or failed):", "", settings.to_markdown(index=False), ""]
    lines += ["## Training", ""]
    for t in trainings:
        s = read_stage_json(Path(t["dir"]) / output_name("train", "summary"))
        kl = "not measured" if s["kl_last"] is None else f"{s['kl_last']:.2f}"  # train.measure_kl
        lines.append(
            f"- **{t['label']}**: {s['steps']} steps in {s['train_time_s'] / 60:.1f} min "
            f"({s.get('tokens', 0):,} tokens, peak memory {s.get('peak_memory_mb', 0):,.0f} MB); "
            f"mean reward {s['reward_first']:.3f} (first steps) -> {s['reward_last']:.3f} (last); "
            f"KL to reference {kl}; response length {s['response_length_last']:.1f} tokens."
        )
        if s.get("collapse"):
            lines.append(f"  - **collapse detected**: {s['collapse']}")
    lines += ["", "![training curves](training_curves.png)", ""]
    if phases is not None:
        lines += ["Where the training time went (seconds, summed over optimizer steps):", "",
                  phases.round(1).to_markdown(), "", "![training time by phase](training_phases.png)", ""]
    lines += validation or []
    lines += ["## Data", ""]
    for name, d in stages.items():
        counts_file = Path(d) / output_name("data", "counts")
        if name.startswith("data_") and counts_file.exists():
            c = read_stage_json(counts_file)
            lines.append(
                f"- {name[len('data_'):]}: {c['rows_out']} of {c['rows_in']} rows used; "
                f"{c.get('beyond_limit', 0)} beyond its limit, dropped {c['dropped_too_long']} too long, "
                f"{c.get('dropped_bad_gold', 0)} with an unparseable gold answer"
            )
    lines += ["", "## Stage directories", ""]
    lines += [f"- {name}: `{d}` (link: `stages/{name}`)" for name, d in stages.items()]
    return "\n".join(lines) + "\n"


def link_stages(out_dir: Path, stages: dict) -> None:
    links = out_dir / "stages"
    links.mkdir(parents=True, exist_ok=True)
    for name, d in stages.items():
        link = links / name
        target = os.path.relpath(Path(d).resolve(), links.resolve())
        tmp = links / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)


def write(spec: dict, out_dir: str | os.PathLike) -> pd.DataFrame:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(spec["evals"])
    link_stages(out_dir, spec["stages"])
    plot_curves(spec["trainings"], out_dir / "training_curves.png")
    phases = phase_times(spec["trainings"])
    plot_phases(phases, out_dir / "training_phases.png")
    with atomic_path(out_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    paper = paper_table(with_settings(table), training_costs(spec["trainings"]))
    with atomic_path(out_dir / "paper_table.csv") as tmp:
        paper.to_csv(tmp, float_format="%.4f")
    write_text(out_dir / "paper_table.tex", paper_table_latex(paper))
    val = write_validation(spec, out_dir) + sweep_markdown(spec.get("sweep", [])) + gap_markdown(spec["trainings"])
    write_text(out_dir / "report.md",
               markdown(spec["experiment"], table, spec["trainings"], spec["stages"], paper, phases, val))
    return table


def write_plan(spec: dict, path: str | os.PathLike) -> None:
    """The spec a report was made from, at its plan's path, written last (the report is complete
    once it exists); the folder's other plan files go, so returning to an earlier plan redoes
    the report this one replaced."""
    path = Path(path)
    write_json(path, spec)
    for other in path.parent.glob("plan-*.json"):
        if other != path:
            other.unlink()


def write_validation(spec: dict, out_dir: Path) -> list[str]:
    """validation_time.png, validation_steps.png, time_to_accuracy.csv; the report's section."""
    points = curves.load(spec["trainings"])
    title = f"{spec['experiment']}: validation accuracy"
    curves.plot(points, "train_time_s", out_dir / "validation_time.png", title)
    curves.plot(points, "optimizer_steps", out_dir / "validation_steps.png", title)
    tta = curves.time_to_accuracy(points) if len(points) else None
    with atomic_path(out_dir / "time_to_accuracy.csv") as tmp:
        (tta if tta is not None else pd.DataFrame()).to_csv(tmp, index_label="method", float_format="%.4f")
    return validation_markdown(spec.get("validation"), tta)


def training_costs(trainings: list[dict]) -> list[dict]:
    """Label, method, seed, training time and peak memory of each run, from summary.json."""
    rows = []
    for t in trainings:
        s = read_stage_json(Path(t["dir"]) / output_name("train", "summary"))
        rows.append({"label": t["label"], "method": t.get("method", t["label"]), "seed": t.get("seed", 0),
                     "train_time_s": s["train_time_s"], "peak_memory_mb": s.get("peak_memory_mb", float("nan"))})
    return rows
