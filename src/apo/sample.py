"""Sample responses for each prompt of a table and grade them, one shard per job: A*-PO's
stage 1 (`sample.n` reference samples per training prompt) and the shards of a benchmark's
evaluation (`evaluate.k` samples per problem) are this one operation with other settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from apo.generation import Generator, SamplingSettings, VLLMSettings, make_generator
from apo.reward import Grader


def shard_rows(
    prompts: pd.DataFrame, shard: int, shards: int, where: str = "prompts", key: str = "shards"
) -> pd.DataFrame:
    """Contiguous blocks, so every prompt lands in exactly one shard."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} outside 0..{shards - 1}")
    if shards > len(prompts):
        raise ValueError(
            f"{where}: {len(prompts)} prompts cannot fill {shards} shards: set config key "
            f"'{key}' to at most {len(prompts)}"
        )
    return prompts.iloc[np.array_split(np.arange(len(prompts)), shards)[shard]]


def load_model(model_path: str, device: str | None = None):
    """Tokenizer and model exactly as for a hub model: `AutoTokenizer` / `AutoModelForCausalLM`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    return model, tokenizer


def open_generator(
    backend: str, model_path: str, generation: dict, prompts: pd.DataFrame, max_new_tokens: int, seed: int
) -> Generator:
    """The configured engine for sampling `prompts`. vLLM loads the model itself (no transformers
    copy in memory) and is sized for the longest prompt plus `max_new_tokens`."""
    from transformers import AutoTokenizer

    if backend == "hf":
        model, tokenizer = load_model(model_path)
        return make_generator("hf", tokenizer, model=model, batch_size=generation["batch_size"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    longest = max(len(ids) for ids in tokenizer(list(prompts["prompt"]), add_special_tokens=False)["input_ids"])
    # Sleep mode frees the engine's memory between a training step's generations; a sampling
    # or evaluation job generates once and exits, so it does not reserve the sleep allocator.
    return make_generator(
        "vllm", tokenizer, model_path=model_path, seed=seed, max_model_len=longest + max_new_tokens,
        vllm=dataclasses.replace(VLLMSettings.from_runtime(generation), sleep=False),
    )


def sample_and_grade(
    generator: Generator, grader: Grader, prompts: pd.DataFrame, sampling: SamplingSettings,
    seed: int | None = None,
) -> pd.DataFrame:
    """One row per (prompt, sample): id, sample, response, num_tokens, finished, reward,
    status, extracted."""
    completions = generator.generate(list(prompts["prompt"]), sampling, seed=seed)
    rows = []
    for (_, p), outs in zip(prompts.iterrows(), completions):
        for j, c in enumerate(outs):
            rows.append(
                {"id": p["id"], "sample": j, "answer": p["answer"], "response": c.text,
                 "num_tokens": len(c.token_ids), "finished": c.finished}
            )
    out = pd.DataFrame(rows)
    grades = grader.grade(list(out["answer"]), list(out["response"]))
    out["reward"], out["status"], out["extracted"] = grades.rewards, grades.status, grades.extracted
    return out


def run_shard(
    kind: str, settings: dict, model_path: str, prompts_path: str, shard: int, generation: dict, grading: dict
) -> tuple[pd.DataFrame, dict]:
    """Stage entry: graded samples for the prompts of one shard of a `sample` or `evaluate`
    stage (`settings` is its manifest's), and their summary metrics. Seeded per shard: shards
    are independent jobs and must not repeat each other's draws."""
    from apo.job import read_stage_parquet, verify_if_stage

    # Reference sampling draws `n` per prompt, evaluation `k` (its config keys).
    sampling = SamplingSettings.from_config(settings, n=settings["n" if kind == "sample" else "k"])
    prompts = shard_rows(read_stage_parquet(prompts_path), shard, settings["shards"], str(prompts_path), f"{kind}.shards")
    seed = settings["seed"] * 10_007 + shard
    verify_if_stage(model_path)  # a trained model is a stage output
    generator = open_generator(settings["backend"], model_path, generation, prompts, sampling.max_new_tokens, seed)
    with Grader.from_settings(settings, grading["workers"]) as grader:
        samples = sample_and_grade(generator, grader, prompts, sampling, seed=seed)
    metrics = {"mean_reward": samples["reward"].mean(), "responses": len(samples),
               "ungraded": int((samples["status"] != "ok").sum()), "mean_tokens": samples["num_tokens"].mean()}
    return samples, metrics
