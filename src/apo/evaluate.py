"""Benchmark evaluation: pass@1 as avg@k (the mean reward over k samples per problem).

A benchmark is split into `evaluate.shards` jobs (so a killed or preempted evaluation redoes
only its unfinished shards), each sampled and graded like a reference sampling shard
(`apo.sample.run_shard`); `run` then scores the benchmark from its shards.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def avg_at_k(samples: pd.DataFrame) -> float:
    """Mean over problems of the mean reward over that problem's k samples."""
    return float(samples.groupby("id")["reward"].mean().mean())


def run(settings: dict, prompts_path: str, shard_paths: list[str]) -> tuple[pd.DataFrame, dict]:
    """Stage entry: every shard's samples in one table, and the benchmark's scores. The data
    stage's counts (counts.json beside the prompts) say how many rows the benchmark has."""
    from apo.job import output_name, read_stage_json, read_stage_parquet

    counts_path = Path(prompts_path).with_name(output_name("data", "counts"))
    if not counts_path.exists():
        raise FileNotFoundError(f"{counts_path}: the data stage's counts are missing (rerun its data stage)")
    counts = read_stage_json(counts_path)
    samples = pd.concat([read_stage_parquet(p) for p in shard_paths], ignore_index=True)
    return samples, scores(settings, read_stage_parquet(prompts_path), samples, counts)


def denominator(settings: dict, scored: int, counts: dict | None) -> tuple[int, int]:
    """(N rows of the benchmark, rows the accuracy is over). Every row read counts, unless a
    setting of this benchmark excludes it: its `limit`, its own `max_prompt_tokens`, or
    `evaluate.unscorable: exclude` for a gold the grader cannot read; an unscorable row
    otherwise stays in the denominator with reward 0."""
    if counts is None:  # no data stage counts: the prompts are the benchmark
        return scored, scored
    excluded = counts.get("beyond_limit", 0) + counts.get("dropped_too_long", 0)
    if settings.get("unscorable", "wrong") == "exclude":
        excluded += counts.get("dropped_bad_gold", 0)
    return counts["rows_in"], counts["rows_in"] - excluded


def scores(settings: dict, prompts: pd.DataFrame, samples: pd.DataFrame, counts: dict | None = None) -> dict:
    """accuracy = the sum over scored problems of their avg@k, divided by the rows counted
    (`denominator`); n = rows scored, n_rows = rows of the benchmark (n / N in the report)."""
    missing = set(prompts["id"]) - set(samples["id"])
    if missing:
        raise ValueError(f"{len(missing)} benchmark problems have no samples (e.g. {sorted(missing)[:3]})")
    status = samples["status"].value_counts().to_dict()
    scored = int(prompts["id"].nunique())
    n_rows, counted = denominator(settings, scored, counts)
    return {
        "accuracy": float(samples.groupby("id")["reward"].mean().sum()) / counted,
        "n": scored,
        "n_rows": n_rows,
        "n_counted": counted,
        "unscorable": int((counts or {}).get("dropped_bad_gold", 0)),
        "k": settings["k"],
        "temperature": settings["temperature"],
        "top_p": settings["top_p"],
        "max_new_tokens": settings["max_new_tokens"],
        "unparsed": int(sum(v for k, v in status.items() if k != "ok")),
        "status_counts": {k: int(v) for k, v in status.items()},
        "mean_response_tokens": float(samples["num_tokens"].mean()),
        "truncated": float((~samples["finished"]).mean()),
    }
