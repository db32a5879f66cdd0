"""`apo bench-grading`: realistic MATH-style responses, both ways timed on the same items."""

from apo.tools import bench_grading
from conftest import grade_one


def test_responses_are_math_style_and_reproducible():
    golds, texts = bench_grading.responses(80, seed=3)
    assert (golds, texts) == bench_grading.responses(80, seed=3)
    assert len(set(golds)) == 10  # 8 samples per gold
    rewards = [grade_one(g, t)[0] for g, t in zip(golds, texts)]
    assert 0.3 < sum(rewards) / len(rewards) < 0.8  # right, wrong, unboxed and cut-off answers


def test_run_prints_both_medians(capsys):
    out = bench_grading.run(n=24, workers=1, repeats=1)
    printed = capsys.readouterr().out
    assert "median: sequential" in printed and "pool of 1" in printed
    assert out["speedup"] > 0 and len(out["rounds"]) == 1
