"""Stage 1a: N graded samples per training prompt from the reference model, one shard a job."""

from __future__ import annotations

import pandas as pd

from apo.generation import SamplingSettings
from apo.rollout import sample_shard


def run(settings: dict, model_path: str, prompts_path: str, shard: int, generation: dict, grading: dict) -> pd.DataFrame:
    sampling = SamplingSettings.from_config(settings)
    return sample_shard(settings, sampling, model_path, prompts_path, shard, generation, grading)
