"""Benchmark evaluation: pass@1 as avg@k (the mean reward over k samples per problem).

A benchmark is split into `evaluate.shards` jobs (so a killed or preempted evaluation redoes
only its unfinished shards), each sampled and graded like a reference sampling shard
(`apo.sample.run_shard`); `run` then scores the benchmark from its shards.
"""

from __future__ import annotations

import pandas as pd


def avg_at_k(samples: pd.DataFrame) -> float:
    """Mean over problems of the mean reward over that problem's k samples."""
    return float(samples.groupby("id")["reward"].mean().mean())


def run(settings: dict, prompts_path: str, shard_paths: list[str]) -> tuple[pd.DataFrame, dict]:
    """Stage entry: every shard's samples in one table, and the benchmark's scores."""
    from apo.job import read_stage_parquet

    samples = pd.concat([read_stage_parquet(p) for p in shard_paths], ignore_index=True)
    return samples, scores(settings, read_stage_parquet(prompts_path), samples)


def scores(settings: dict, prompts: pd.DataFrame, samples: pd.DataFrame) -> dict:
    missing = set(prompts["id"]) - set(samples["id"])
    if missing:
        raise ValueError(f"{len(missing)} benchmark problems have no samples (e.g. {sorted(missing)[:3]})")
    status = samples["status"].value_counts().to_dict()
    return {
        "accuracy": avg_at_k(samples),
        "n": int(prompts["id"].nunique()),
        "k": settings["k"],
        "temperature": settings["temperature"],
        "top_p": settings["top_p"],
        "max_new_tokens": settings["max_new_tokens"],
        "unparsed": int(sum(v for k, v in status.items() if k != "ok")),
        "status_counts": {k: int(v) for k, v in status.items()},
        "mean_response_tokens": float(samples["num_tokens"].mean()),
        "truncated": float((~samples["finished"]).mean()),
    }
