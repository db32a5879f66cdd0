"""Sampling shards and a benchmark's scores: the sample stage's core (`apo.sample`) with a
scripted engine and grader, and avg@k over a benchmark's shards (`apo.evaluate`)."""

import json

import pandas as pd
import pytest

from apo.evaluate import avg_at_k, run, scores
from apo.generation import Completion, SamplingSettings
from apo.job import record_outputs
from apo.reward import Grades
from apo.sample import sample_and_grade


class ScriptedEngine:
    """Answers prompt p's j-th sample with "p:j"."""

    def generate(self, prompts, sampling, seed=None):
        return [[Completion(f"{p}:{j}", [1] * (j + 1), finished=j > 0) for j in range(sampling.n)] for p in prompts]


class PrefixGrader:
    """Reward 1 when the response's sample index equals the gold."""

    def grade(self, golds, responses):
        rewards = [float(r.split(":")[1] == g) for g, r in zip(golds, responses)]
        return Grades(rewards, ["ok"] * len(rewards), [r.split(":")[1] for r in responses])


def test_sample_and_grade_gives_one_graded_row_per_prompt_and_sample():
    prompts = pd.DataFrame({"id": ["a", "b"], "prompt": ["A", "B"], "answer": ["0", "2"]})
    out = sample_and_grade(ScriptedEngine(), PrefixGrader(), prompts, SamplingSettings(n=3, temperature=1.0))
    assert out[["id", "sample"]].values.tolist() == [["a", 0], ["a", 1], ["a", 2], ["b", 0], ["b", 1], ["b", 2]]
    assert out["reward"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert out["num_tokens"].tolist() == [1, 2, 3, 1, 2, 3] and out["finished"].tolist() == [False, True, True] * 2


def test_avg_at_k_averages_within_a_problem_first():
    samples = pd.DataFrame({"id": ["a"] * 4 + ["b"] * 2, "reward": [1, 1, 1, 1, 0, 1]})
    assert avg_at_k(samples) == pytest.approx((1.0 + 0.5) / 2)  # not 5/6, the pooled mean


def shard(rows):
    return pd.DataFrame([{"id": i, "sample": j, "reward": r, "status": s, "num_tokens": 3, "finished": f}
                         for i, j, r, s, f in rows])


def test_scores_from_shards_count_unparsed_and_truncated(tmp_path):
    d = tmp_path / "results" / "evaluate" / "0123456789ab"
    d.mkdir(parents=True)
    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": ["a", "b"]}).to_parquet(prompts)
    (tmp_path / "counts.json").write_text(json.dumps(COUNTS))
    shard(["a", j, 1.0, "ok", True] for j in range(2)).to_parquet(d / "shard-0.parquet")
    shard([["b", 0, 0.0, "no_answer", False], ["b", 1, 1.0, "ok", True]]).to_parquet(d / "shard-1.parquet")
    record_outputs(d, {"kind": "evaluate", "hash": "0123456789ab"}, [d / "shard-0.parquet", d / "shard-1.parquet"])
    settings = {"k": 2, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}
    samples, s = run(settings, str(prompts), [str(d / "shard-0.parquet"), str(d / "shard-1.parquet")])
    assert len(samples) == 4 and s["accuracy"] == pytest.approx(0.75) and s["n"] == 2 and s["k"] == 2
    assert s["unparsed"] == 1 and s["status_counts"] == {"ok": 3, "no_answer": 1} and s["truncated"] == 0.25
    json.dumps(s)  # scores.json


COUNTS = {"rows_in": 2, "rows_out": 2, "beyond_limit": 0, "dropped_too_long": 0, "dropped_bad_gold": 0}
SETTINGS = {"k": 1, "temperature": 0, "top_p": 1, "max_new_tokens": 4}


def test_an_unscorable_row_counts_as_wrong_unless_excluded():
    # 4 rows read, one gold unreadable (dropped by the data stage), 3 scored: 2 right.
    prompts = pd.DataFrame({"id": ["a", "b", "c"]})
    samples = shard([["a", 0, 1.0, "ok", True], ["b", 0, 1.0, "ok", True], ["c", 0, 0.0, "ok", True]])
    counts = {**COUNTS, "rows_in": 4, "rows_out": 3, "dropped_bad_gold": 1}
    wrong = scores({**SETTINGS, "unscorable": "wrong"}, prompts, samples, counts)
    assert (wrong["accuracy"], wrong["n"], wrong["n_rows"], wrong["n_counted"]) == (0.5, 3, 4, 4)
    assert wrong["unscorable"] == 1
    excluded = scores({**SETTINGS, "unscorable": "exclude"}, prompts, samples, counts)
    assert excluded["accuracy"] == pytest.approx(2 / 3) and excluded["n_counted"] == 3


def test_rows_a_benchmark_setting_leaves_out_are_not_counted():
    """its `limit` and its own `max_prompt_tokens` are explicit choices: out of the denominator,
    but still in N rows, so the report shows n / N and warns."""
    prompts = pd.DataFrame({"id": ["a", "b"]})
    samples = shard([["a", 0, 1.0, "ok", True], ["b", 0, 0.0, "ok", True]])
    counts = {**COUNTS, "rows_in": 10, "beyond_limit": 7, "dropped_too_long": 1}
    s = scores(SETTINGS, prompts, samples, counts)
    assert (s["accuracy"], s["n"], s["n_rows"], s["n_counted"]) == (0.5, 2, 10, 2)


def test_evaluation_needs_the_data_stage_counts(tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": ["a"]}).to_parquet(prompts)
    with pytest.raises(FileNotFoundError, match="counts.json"):
        run(SETTINGS, str(prompts), [])


def test_a_problem_without_samples_is_an_error():
    prompts = pd.DataFrame({"id": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="2 benchmark problems have no samples"):
        scores({"k": 1, "temperature": 0, "top_p": 1, "max_new_tokens": 4}, prompts, shard([["a", 0, 1.0, "ok", True]]))
