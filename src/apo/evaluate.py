"""Benchmark evaluation: pass@1 as avg@k (the mean reward over k samples per problem).

A benchmark is split into `evaluate.shards` jobs (so a killed or preempted evaluation redoes only
its unfinished shards); `scores` then reads the shards' per-problem samples.
"""

from __future__ import annotations

import pandas as pd

from apo.generation import SamplingSettings
from apo.rollout import sample_shard


def avg_at_k(samples: pd.DataFrame) -> float:
    """Mean over problems of the mean reward over that problem's k samples."""
    return float(samples.groupby("id")["reward"].mean().mean())


def run_shard(settings: dict, model_path: str, prompts_path: str, shard: int, generation: dict, grading: dict):
    """k graded samples for every problem of one shard."""
    sampling = SamplingSettings.from_config(settings, n=settings["k"])
    return sample_shard(settings, sampling, model_path, prompts_path, shard, generation, grading, "evaluate.shards")


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
