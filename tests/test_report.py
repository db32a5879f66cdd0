"""The paper's comparison table, built from fabricated accuracies and training costs whose
means and ratios are checked by hand."""

import json
import math
import re

import pandas as pd
import pytest

from apo.report import paper_table, paper_table_latex, paper_table_markdown

ACC = {  # model label -> (b1, b2) accuracy in %
    "reference": (30.0, 10.0),
    "apo-seed0": (40.0, 20.0), "apo-seed1": (50.0, 30.0),
    "grpo-seed0": (44.0, 20.0), "grpo-seed1": (46.0, 22.0),
    "rebel-seed0": (41.0, 19.0),
}
ACCURACY = pd.DataFrame([{"benchmark": b, "model": m, "accuracy": a[i]}
                         for i, b in enumerate(["b1", "b2"]) for m, a in ACC.items()])
TRAININGS = [  # label, method, seed, seconds, MB
    {"label": "apo-seed0", "method": "apo", "seed": 0, "train_time_s": 3600, "peak_memory_mb": 10240},
    {"label": "apo-seed1", "method": "apo", "seed": 1, "train_time_s": 5400, "peak_memory_mb": 12288},
    {"label": "grpo-seed0", "method": "grpo", "seed": 0, "train_time_s": 9000, "peak_memory_mb": 16384},
    {"label": "grpo-seed1", "method": "grpo", "seed": 1, "train_time_s": 9000, "peak_memory_mb": 16384},
    {"label": "rebel-seed0", "method": "rebel", "seed": 0, "train_time_s": 6750, "peak_memory_mb": 22528},
]


@pytest.fixture
def table():
    return paper_table(ACCURACY, TRAININGS)


def test_rows_are_methods_in_the_papers_order_with_seed_means(table):
    assert table.index.tolist() == ["reference", "A*-PO", "GRPO", "REBEL"]
    assert table.columns.tolist() == ["b1", "b2", "average", "seeds", "train_hours", "peak_memory_gb",
                                      "time_ratio", "memory_ratio"]
    # A*-PO: b1 (40+50)/2 = 45, b2 (20+30)/2 = 25, average 35; GRPO 45, 21, 33
    assert table.loc["A*-PO", ["b1", "b2", "average"]].tolist() == [45.0, 25.0, 35.0]
    assert table.loc["GRPO", ["b1", "b2", "average"]].tolist() == [45.0, 21.0, 33.0]
    assert table.loc["reference", "average"] == 20.0
    assert table["seeds"].tolist()[1:] == [2, 2, 1]


def test_costs_and_ratios_to_apo(table):
    # A*-PO: (1 h + 1.5 h)/2 = 1.25 h, (10 + 12 GB)/2 = 11 GB
    assert table.loc["A*-PO", "train_hours"] == pytest.approx(1.25)
    assert table.loc["A*-PO", "peak_memory_gb"] == pytest.approx(11.0)
    # GRPO: 2.5 h / 1.25 h = 2.0; 16 GB / 11 GB; REBEL: 1.875 h / 1.25 h = 1.5; 22 GB / 11 GB = 2.0
    assert table.loc["GRPO", ["time_ratio", "memory_ratio"]].tolist() == pytest.approx([2.0, 16 / 11])
    assert table.loc["REBEL", ["time_ratio", "memory_ratio"]].tolist() == pytest.approx([1.5, 2.0])
    assert table.loc["A*-PO", ["time_ratio", "memory_ratio"]].tolist() == [1.0, 1.0]
    assert table.loc["reference", COSTS].isna().all()


COSTS = ["train_hours", "peak_memory_gb", "time_ratio", "memory_ratio"]


def test_without_apo_the_ratios_are_undefined():
    t = paper_table(ACCURACY[~ACCURACY["model"].str.startswith("apo")], TRAININGS[2:])
    assert t.index.tolist() == ["reference", "GRPO", "REBEL"]
    assert t["time_ratio"].isna().all() and not math.isnan(t.loc["GRPO", "train_hours"])


def test_markdown_and_latex(table):
    md = paper_table_markdown(table)
    assert "| A*-PO " in md and "2.00" in md and "1.45" in md and "–" in md
    tex = paper_table_latex(table)
    assert tex.startswith("\\begin{tabular}") and "\\toprule" in tex
    assert "GRPO & 45.00 & 21.00 & 33.00 & 2 & 2.50" in tex
    assert "train\\_hours" in tex and "--" in tex  # escaped, n/a for the reference's cost


def test_phase_times_sum_each_phase_and_count_untimed_phases_as_zero(tmp_path):
    from apo.report import phase_times, plot_phases

    runs = []
    for label, values in [("apo", None), ("ppo", [0.5, 0.25])]:
        d = tmp_path / label
        d.mkdir()
        m = pd.DataFrame({"step": [1, 2], "time_generate_s": [1.0, 2.0], "time_grade_s": [0.1, 0.1],
                          "time_ref_logprobs_s": [0.2, 0.3], "time_update_s": [3.0, 4.0], "time_sync_s": [0.01, 0.02]})
        if values is not None:
            m["time_values_s"] = values
        m.to_parquet(d / "metrics.parquet")
        runs.append({"label": label, "dir": str(d)})
    phases = phase_times(runs)
    assert list(phases.index) == ["apo", "ppo"]
    assert phases.loc["apo"].tolist() == pytest.approx([3.0, 0.2, 0.5, 0.0, 0.0, 7.0, 0.03])  # no pi_old, no critic
    assert phases.loc["ppo", "critic values"] == pytest.approx(0.75)
    plot_phases(phases, tmp_path / "phases.png")
    assert (tmp_path / "phases.png").stat().st_size > 1000


def test_every_reported_accuracy_carries_its_evaluation_settings():
    from apo.report import markdown, with_settings

    rows = [
        {"benchmark": "math500", "model": m, "accuracy": a, "n": 500, "n_rows": 500, "n_counted": 500,
         "scored": "500/500", "k": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024, "unparsed": 0}
        for m, a in [("reference", 45.8), ("apo", 57.8)]
    ] + [
        {"benchmark": "amc23", "model": m, "accuracy": a, "n": 40, "n_rows": 40, "n_counted": 40,
         "scored": "40/40", "k": 32, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 1024, "unparsed": 0}
        for m, a in [("reference", 20.55), ("apo", 31.88)]
    ]
    table = pd.DataFrame(rows)
    paper = paper_table(with_settings(table), [])
    amc = "amc23 (avg@32, T 0.6, top-p 0.95, 1024 tokens, 40/40 rows)"
    math500 = "math500 (avg@1, greedy, 1024 tokens, 500/500 rows)"
    assert paper.columns.tolist()[:2] == [math500, amc]
    md = markdown("x", table, [], {}, paper)
    accuracy_header = md.split("## Accuracy")[1].splitlines()[2]
    assert amc in accuracy_header and math500 in accuracy_header
    assert amc in paper_table_markdown(paper) and "avg@32" in paper_table_latex(paper)
    assert "40/40 rows" in paper_table_latex(paper) and "40/40 rows" in paper.to_csv()
    assert "Warning" not in md  # every row scored


def test_a_benchmark_scored_on_a_subset_is_flagged(tmp_path):
    from apo.io import write_json
    from apo.report import markdown, summary_table, with_settings

    d = tmp_path / "eval"
    d.mkdir()
    write_json(d / "scores.json", {"accuracy": 0.5, "n": 486, "n_rows": 500, "n_counted": 498, "k": 1,
                                   "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "unparsed": 0})
    table = summary_table([{"model": "reference", "benchmark": "math500", "dir": str(d)}])
    assert table["scored"].tolist() == ["486/500"]
    md = markdown("x", table, [], {}, paper_table(with_settings(table), []))
    assert "**Warning**: math500 scored 486 of its 500 rows; the accuracy is over 498" in md
    assert "486/500 rows" in md.split("## Accuracy")[1].splitlines()[2]


def _fake_run(root, label, times, accuracies, gap=None, kl=0.0):
    from apo.io import write_json

    d = root / label
    d.mkdir()
    steps = list(range(1, len(times)))
    gaps = {} if gap is None else {"logprob_gap_mean": gap[0], "logprob_gap_max": gap[1]}
    kls = {} if kl is None else {"kl": kl}  # None: not measured (train.measure_kl)
    pd.DataFrame({"step": steps, "reward": 0.5, "loss": 0.1, **kls, "response_length": 10.0,
                  "optimizer_steps": 1, "time_step_s": [times[s] - times[s - 1] for s in steps],
                  "time_generate_s": 0.1, **gaps}).to_parquet(d / "metrics.parquet")
    pd.DataFrame({"step": list(range(len(times))), "train_time_s": times,
                  "accuracy": accuracies}).to_parquet(d / "validation.parquet")
    write_json(d / "summary.json", {"steps": len(steps), "train_time_s": times[-1], "reward_first": 0.5,
                                    "reward_last": 0.5, "kl_last": kl, "response_length_last": 10.0, **gaps})
    return {"label": label, "method": label, "seed": 0, "dir": str(d)}


def test_report_holds_the_validation_curves_and_time_to_accuracy(tmp_path):
    from apo import report
    from apo.io import write_json

    trainings = [_fake_run(tmp_path, "apo", [0.0, 60.0, 120.0], [0.4, 0.7, 0.8], gap=(4.7e-4, 5.3e-3)),
                 _fake_run(tmp_path, "grpo", [0.0, 300.0, 600.0], [0.4, 0.78, 0.8], kl=None)]
    evals = []
    for label in ("reference", "apo", "grpo"):
        d = tmp_path / f"eval-{label}"
        d.mkdir()
        write_json(d / "scores.json", {"accuracy": 0.5, "n": 10, "n_rows": 10, "n_counted": 10, "k": 1,
                                       "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "unparsed": 0})
        evals.append({"model": label, "benchmark": "b", "dir": str(d)})
    sweep = [{"method": "apo", "label": "apo-lr0.0001", "combo": {"lr": 1e-4}, "dir": trainings[1]["dir"],
              "picked": False},
             {"method": "apo", "label": "apo-lr0.0003", "combo": {"lr": 3e-4}, "dir": trainings[0]["dir"],
              "picked": True}]
    spec = {"experiment": "x", "evals": evals, "trainings": trainings, "stages": {},
            "validation": {"dataset": "demo split valid", "on_benchmark": True, "k": 4, "temperature": 1.0},
            "sweep": sweep}
    report.write(spec, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![validation accuracy against training time](validation_time.png)" in md
    assert "not held out from the test benchmarks" in md and "demo split valid" in md
    assert re.search(r"\*\*apo\*\*: .*KL to reference 0\.00;", md)
    assert re.search(r"\*\*grpo\*\*: .*KL to reference not measured;", md)
    assert "scored as avg@4 at temperature 1 (`train.validation`)" in md
    tta = pd.read_csv(tmp_path / "out" / "time_to_accuracy.csv", index_col="method")
    # best final 0.8 (both); 95 % = 0.76: A*-PO at 120 s, GRPO at 300 s; 100 %: 120 s and 600 s
    assert tta.loc["apo", "time_to_95_s"] == 120 and tta.loc["grpo", "time_to_95_s"] == 300
    assert tta.loc["grpo", "ratio_95"] == pytest.approx(2.5) and tta.loc["grpo", "ratio_100"] == pytest.approx(5.0)
    # the grid and the pick
    assert "## Sweep" in md and re.search(r"\| A\*-PO +\| 0.0003 +\| 80.00 +\| 2.00 +\| yes", md)
    assert md.split("## Sweep")[1].count("| yes") == 1
    # the train-inference gap of the run that logged it (a run without it is left out)
    assert re.search(r"## Train-inference gap(.|\n)*\| apo +\| 4.70e-04 +\| 5.30e-03 +\|", md)
    assert "| grpo " not in md.split("## Train-inference gap")[1]
    for name in ("validation_time.png", "validation_steps.png"):
        assert (tmp_path / "out" / name).stat().st_size > 5000


def test_the_report_rule_declares_every_file_the_report_writes():
    """apo.report.FILES is the one list (rule all asks for it, `apo report` logs it): the
    report rule's outputs must be exactly those files."""
    from apo.report import FILES
    from conftest import ROOT

    rule = (ROOT / "workflow" / "rules" / "report.smk").read_text()
    declared = re.findall(r'f"\{EXPERIMENT_DIR\}/([^"/]+)"', rule.split("    output:")[1].split("    log:")[0])
    assert sorted(declared) == sorted(FILES)


def test_the_plan_file_is_the_spec_and_replaces_the_folders_other_plans(tmp_path):
    """A report's plan file is written last and is the only plan-*.json of its folder: going back
    to an earlier plan finds its file gone and redoes the report."""
    from apo.report import write_plan

    earlier = tmp_path / "plan-aaaaaaaaaaaa.json"
    earlier.write_text("{}")
    keep = tmp_path / "report.log"
    keep.write_text("log")
    spec = {"experiment": "x", "evals": [], "trainings": []}
    write_plan(spec, tmp_path / "plan-bbbbbbbbbbbb.json")
    assert json.loads((tmp_path / "plan-bbbbbbbbbbbb.json").read_text()) == spec
    assert not earlier.exists() and keep.read_text() == "log"
