"""Benchmark evaluation: pass@1 as avg@k (the mean reward over k samples per problem)."""

from __future__ import annotations

import pandas as pd

from apo.generation import SamplingSettings
from apo.reward import Grader
from apo.rollout import open_generator, sample_and_grade


def avg_at_k(samples: pd.DataFrame) -> float:
    """Mean over problems of the mean reward over that problem's k samples."""
    return float(samples.groupby("id")["reward"].mean().mean())


def run(settings: dict, model_path: str, prompts_path: str, generation: dict, grading: dict):
    prompts = pd.read_parquet(prompts_path)
    sampling = SamplingSettings.from_config(settings, n=settings["k"])
    generator = open_generator(
        settings["backend"], model_path, generation, prompts, sampling.max_new_tokens, settings["seed"]
    )
    with Grader(grading["timeout_s"], grading["workers"]) as grader:
        samples = sample_and_grade(generator, grader, prompts, sampling, seed=settings["seed"])
    status = samples["status"].value_counts().to_dict()
    scores = {
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
    return samples, scores
