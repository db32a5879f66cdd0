"""Validation curves and time to accuracy, on hand-made curves whose answers are worked out
by hand."""

import math

import pandas as pd
import pytest

from apo import curves

# method, seed, [(step, training seconds, accuracy)]
RUNS = {
    ("apo", 0): [(0, 0, 0.40), (50, 60, 0.60), (100, 120, 0.70), (150, 180, 0.72)],
    ("apo", 1): [(0, 0, 0.40), (50, 80, 0.64), (100, 140, 0.74), (150, 200, 0.76)],
    ("grpo", 0): [(0, 0, 0.40), (50, 400, 0.70), (100, 800, 0.78), (150, 1200, 0.80)],
    ("rebel", 0): [(0, 0, 0.40), (50, 100, 0.45), (100, 200, 0.50), (150, 300, 0.55)],
}


def points() -> pd.DataFrame:
    rows = [{"label": f"{m}-seed{s}", "method": m, "seed": s, "step": st, "optimizer_steps": st,
             "train_time_s": float(t), "accuracy": a}
            for (m, s), pts in RUNS.items() for st, t, a in pts]
    return pd.DataFrame(rows)


def test_mean_over_seeds_with_the_range():
    apo = curves.mean_curves(points()).query("method == 'apo'")
    assert apo["accuracy"].tolist() == pytest.approx([0.40, 0.62, 0.72, 0.74])
    assert apo["train_time_s"].tolist() == pytest.approx([0, 70, 130, 190])
    assert apo["low"].tolist() == pytest.approx([0.40, 0.60, 0.70, 0.72])
    assert apo["high"].tolist() == pytest.approx([0.40, 0.64, 0.74, 0.76])


def test_time_to_reach_is_the_first_validation_at_or_above_the_target():
    curve = pd.DataFrame({"train_time_s": [0, 10, 20, 30], "accuracy": [0.1, 0.5, 0.4, 0.6]})
    assert curves.time_to_reach(curve, 0.45) == 10  # not 30: reached once is reached
    assert curves.time_to_reach(curve, 0.5) == 10  # equal counts
    assert curves.time_to_reach(curve, 0.1) == 0
    assert math.isnan(curves.time_to_reach(curve, 0.61))


def test_time_to_accuracy_of_the_best_final_method_with_ratios_to_apo():
    t = curves.time_to_accuracy(points())
    assert t.index.tolist() == ["apo", "grpo", "rebel"]
    # best final: GRPO 0.80; 95 % of it = 0.76, 100 % = 0.80
    assert t.attrs["target_method"] == "grpo" and t.attrs["best_final"] == pytest.approx(0.80)
    assert t["final_accuracy"].tolist() == pytest.approx([0.74, 0.80, 0.55])
    # A*-PO's mean curve never reaches 0.76 (seed 1 alone does): not reached
    assert math.isnan(t.loc["apo", "time_to_95_s"]) and math.isnan(t.loc["apo", "time_to_100_s"])
    assert t.loc["grpo", "time_to_95_s"] == 800 and t.loc["grpo", "time_to_100_s"] == 1200
    assert math.isnan(t.loc["rebel", "time_to_95_s"])
    assert t["ratio_95"].isna().all()  # A*-PO did not get there: no ratio


def test_ratios_divide_by_apos_time():
    p = points()
    p.loc[(p["method"] == "apo") & (p["step"] == 150), "accuracy"] = 0.82  # both seeds: mean 0.82
    t = curves.time_to_accuracy(p)
    assert t.attrs["target_method"] == "apo" and t.attrs["best_final"] == pytest.approx(0.82)
    # 95 % of 0.82 = 0.779: A*-PO at 190 s (its last validation), GRPO at 800 s
    assert t.loc["apo", "time_to_95_s"] == pytest.approx(190) and t.loc["grpo", "time_to_95_s"] == 800
    assert t.loc["grpo", "ratio_95"] == pytest.approx(800 / 190) and t.loc["apo", "ratio_95"] == 1.0
    md = curves.markdown(t)
    assert "| A*-PO " in md and "not reached" in md and "13.33" in md  # GRPO 800 s = 13.33 min
    assert "4.21" in md  # 800 / 190


def test_plots_render_with_seeds_and_without_validation(tmp_path):
    curves.plot(points(), "train_time_s", tmp_path / "time.png", "t")
    curves.plot(points(), "optimizer_steps", tmp_path / "steps.png", "t")
    curves.plot(curves.load([]), "train_time_s", tmp_path / "none.png", "t")
    assert all((tmp_path / f).stat().st_size > 5000 for f in ("time.png", "steps.png", "none.png"))


def test_load_reads_validation_files_and_counts_optimizer_steps(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    pd.DataFrame({"step": [0, 2], "train_time_s": [0.0, 3.0], "accuracy": [0.1, 0.2]}).to_parquet(d / "validation.parquet")
    pd.DataFrame({"step": [1, 2], "optimizer_steps": [2, 2]}).to_parquet(d / "metrics.parquet")
    (tmp_path / "none").mkdir()
    got = curves.load([{"label": "apo", "method": "apo", "seed": 0, "dir": str(d)},
                       {"label": "grpo", "method": "grpo", "seed": 0, "dir": str(tmp_path / "none")}])
    assert got["optimizer_steps"].tolist() == [0, 4] and set(got["label"]) == {"apo"}


def test_no_ratio_when_apo_is_there_before_training():
    p = points()
    p.loc[p["method"] == "apo", "accuracy"] = 0.80  # the reference is already at the best final accuracy
    t = curves.time_to_accuracy(p)
    assert t.loc["apo", "time_to_100_s"] == 0 and t["ratio_100"].isna().all()
