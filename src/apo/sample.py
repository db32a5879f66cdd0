"""Stage 1a: N graded samples per training prompt from the reference model, one shard a job."""

from __future__ import annotations

import pandas as pd

from apo.generation import SamplingSettings
from apo.reward import Grader
from apo.rollout import open_generator, sample_and_grade, shard_rows


def run(settings: dict, model_path: str, prompts_path: str, shard: int, generation: dict, grading: dict) -> pd.DataFrame:
    prompts = shard_rows(pd.read_parquet(prompts_path), shard, settings["shards"])
    # Seed per shard: shards are independent jobs and must not repeat each other's draws.
    seed = settings["seed"] * 10_007 + shard
    sampling = SamplingSettings.from_config(settings)
    generator = open_generator(settings["backend"], model_path, generation, prompts, sampling.max_new_tokens, seed)
    with Grader(grading["timeout_s"], grading["workers"]) as grader:
        return sample_and_grade(generator, grader, prompts, sampling, seed=seed)
