"""Validation during training: the policy's accuracy on held-out prompts (data.validation),
every `train.validate_every` steps, before the first step and after the last.

The trainer's own engine generates (it holds the current weights already) and its Grader
grades; the call is timed apart from the training steps, so training time (`time_step_s`)
never includes it. Each row records the step, the training wall time up to that step and the
accuracy: the points of an accuracy-against-time curve.

With several training processes each validates its share of the prompts (every world-th
row) with its own engine and the counts are summed: validation then takes 1/world of the
time, where validating on rank 0 alone would leave the other engines idle at a barrier.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd
import torch

from apo.generation import SamplingSettings
from apo.vstar import normalize_text

log = logging.getLogger(__name__)

# validation.parquet columns, in order
COLUMNS = ["step", "train_time_s", "accuracy", "n", "k", "response_length", "truncated", "time_validate_s"]


@dataclass
class ValidationSet:
    prompts: pd.DataFrame  # this process's share of data.validation
    n_total: int  # problems over all processes
    sampling: SamplingSettings
    every: int
    seed: int


class OverlapError(ValueError):
    """The validation set is mostly training problems."""


def check_held_out(validation: pd.DataFrame, training: pd.DataFrame, path: str) -> int:
    """How many validation problems the policy also trains on, compared by the problem text
    (the config check compares data sources by location and content; this one also sees a
    file that copies another's rows). More than half: the validation set is the training set
    under another name, an error; fewer: a warning naming some, and the count."""
    trained = set(map(normalize_text, training["question"]))
    shared = validation[[normalize_text(q) in trained for q in validation["question"]]]
    if len(shared) * 2 > len(validation):
        raise OverlapError(f"{path}: {len(shared)} of the {len(validation)} validation problems are training "
                           f"problems (e.g. ids {list(shared['id'][:3])}); data.validation must be held out from data.train")
    if len(shared):
        log.warning("%s: %d of the %d validation problems are also training problems (e.g. ids %s); its accuracy "
                    "is not fully held out", path, len(shared), len(validation), list(shared["id"][:3]))
    return len(shared)


def load(s: dict, path: str, process_index: int, world: int, training: pd.DataFrame) -> ValidationSet:
    """This process's share of the validation prompts and the settings to sample them with;
    `training` (the prompts the policy trains on) is checked not to be the same problems."""
    from apo.job import read_stage_parquet

    data = read_stage_parquet(path)
    check_held_out(data, training, path)
    v = s["validation"]
    sampling = SamplingSettings(n=v["k"], temperature=v["temperature"], top_p=v["top_p"],
                                max_new_tokens=v["max_new_tokens"])
    return ValidationSet(data.iloc[process_index::world], len(data), sampling, s["validate_every"],
                         v["seed"] * 10_007 + process_index)


def due(step: int, last_step: int, every: int, done: list[dict]) -> bool:
    """Validate after `step` completed steps: at 0, every `every`, at the last step; once."""
    if done and done[-1]["step"] >= step:
        return False  # resumed from a checkpoint that holds this validation
    return step == 0 or step % every == 0 or step == last_step


def score(generator, grader, vs: ValidationSet) -> dict:
    """Sums over this process's share: correct (avg over k per problem), problems, response
    tokens and truncated responses."""
    outs = generator.generate(list(vs.prompts["prompt"]), vs.sampling, progress=False, seed=vs.seed)
    texts = [c.text for cs in outs for c in cs]
    grades = grader.grade(list(vs.prompts["answer"].repeat(vs.sampling.n)), texts)
    k = vs.sampling.n
    return {
        "correct": sum(grades.rewards) / k,
        "problems": float(len(outs)),
        "tokens": sum(len(c.token_ids) for cs in outs for c in cs) / k,
        "truncated": sum(not c.finished for cs in outs for c in cs) / k,
    }


def run(t, grader, vs: ValidationSet, step: int, train_time_s: float) -> dict:
    """One validation of the policy `t.generator` samples from, after `step` training steps
    that took `train_time_s` seconds; the row for validation.parquet."""
    clock = time.perf_counter()
    sums = score(t.generator, grader, vs)
    if t.world > 1:
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=t.accelerator.device)
        sums = dict(zip(sums, t.accelerator.reduce(values, "sum").tolist()))
    problems = max(sums["problems"], 1.0)
    return {
        "step": step,
        "train_time_s": train_time_s,
        "accuracy": sums["correct"] / problems,
        "n": vs.n_total,
        "k": vs.sampling.n,
        "response_length": sums["tokens"] / problems,
        "truncated": sums["truncated"] / problems,
        "time_validate_s": time.perf_counter() - clock,
    }


def frame(rows: list[dict]) -> pd.DataFrame:
    """validation.parquet: one row per validation (no rows when the run had no validation set)."""
    return pd.DataFrame(rows, columns=COLUMNS)
