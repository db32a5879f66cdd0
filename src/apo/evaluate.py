"""Benchmark evaluation: pass@1 as avg@k (the mean reward over k samples per problem)."""

from __future__ import annotations

import pandas as pd
import torch

from apo.generation import SamplingSettings, make_generator
from apo.reward import Grader
from apo.rollout import load_model, sample_and_grade


def avg_at_k(samples: pd.DataFrame) -> float:
    """Mean over problems of the mean reward over that problem's k samples."""
    return float(samples.groupby("id")["reward"].mean().mean())


def run(settings: dict, model_path: str, prompts_path: str, generation: dict, grading: dict):
    prompts = pd.read_parquet(prompts_path)
    torch.manual_seed(settings["seed"])
    model, tokenizer = load_model(model_path)
    generator = make_generator(settings["backend"], model, tokenizer, generation["batch_size"])
    sampling = SamplingSettings.from_config(settings, n=settings["k"])
    with Grader(grading["timeout_s"], grading["workers"]) as grader:
        samples = sample_and_grade(generator, grader, prompts, sampling)
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
