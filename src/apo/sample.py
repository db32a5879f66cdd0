"""Stage 1a: N graded samples per training prompt from the reference model, one shard a job."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from apo.generation import SamplingSettings, make_generator
from apo.reward import Grader
from apo.rollout import load_model, sample_and_grade


def shard_rows(prompts: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """Contiguous blocks, so every prompt lands in exactly one shard."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} outside 0..{shards - 1}")
    return prompts.iloc[np.array_split(np.arange(len(prompts)), shards)[shard]]


def run(settings: dict, model_path: str, prompts_path: str, shard: int, generation: dict, grading: dict) -> pd.DataFrame:
    prompts = shard_rows(pd.read_parquet(prompts_path), shard, settings["shards"])
    # Seed per shard: shards are independent jobs and must not repeat each other's draws.
    torch.manual_seed(settings["seed"] * 10_007 + shard)
    model, tokenizer = load_model(model_path)
    generator = make_generator(settings["backend"], model, tokenizer, generation["batch_size"])
    sampling = SamplingSettings.from_config(settings)
    with Grader(grading["timeout_s"], grading["workers"]) as grader:
        return sample_and_grade(generator, grader, prompts, sampling)
