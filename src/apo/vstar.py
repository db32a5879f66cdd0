"""Stage 1 of A*-PO: the optimal value V*(x) estimated from reference samples.

    V*_hat(x) = beta1 * log( (1/N) * sum_i exp(r_i / beta1) )        (apo-method.md, stage 1)

computed with logsumexp so large 1/beta1 does not overflow. Limits: beta1 -> 0 gives
max_i r_i, beta1 -> inf the plain mean; beta1 = 0 means "use the mean", as in the authors'
code.
"""

from __future__ import annotations

import math

import pandas as pd
import torch


def vstar_estimate(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """V* per row of `rewards` ([prompts, N]); beta1 == 0 gives the mean over the row."""
    if beta1 < 0:
        raise ValueError(f"vstar.beta1 must be >= 0, got {beta1}")
    rewards = rewards.double()
    if beta1 == 0:
        return rewards.mean(dim=-1)
    n = rewards.shape[-1]
    return beta1 * (torch.logsumexp(rewards / beta1, dim=-1) - math.log(n))


FILTERS = ("keep_all", "drop_unsolved", "drop_unsolved_and_solved")


def filter_prompts(table: pd.DataFrame, how: str) -> pd.DataFrame:
    """Prompt filtering from stage 1 (apo-method.md): prompts no reference sample solved give
    no learning signal (the paper reports 28% less stage-2 time from dropping them); prompts
    every sample solved give little.

    how: keep_all | drop_unsolved | drop_unsolved_and_solved.
    """
    if how not in FILTERS:
        raise ValueError(f"vstar.filter must be one of {FILTERS}, got {how!r}")
    keep = pd.Series(True, index=table.index)
    if how in ("drop_unsolved", "drop_unsolved_and_solved"):
        keep &= table["n_correct"] > 0
    if how == "drop_unsolved_and_solved":
        keep &= table["n_correct"] < table["n_samples"]
    return table[keep].reset_index(drop=True)


def vstar_table(samples: pd.DataFrame, beta1: float) -> pd.DataFrame:
    """One row per prompt: id, vstar, n_samples, n_correct, mean_reward.

    `samples` has one row per graded reference response (columns id, reward).
    """
    groups = samples.groupby("id", sort=True)["reward"]
    counts = groups.size()
    if counts.nunique() > 1:
        # Rows of unequal N are fine for the estimator, but usually mean a broken shard.
        bad = counts[counts != counts.mode()[0]]
        raise ValueError(f"unequal number of samples per prompt, e.g. {bad.index[0]!r}: {bad.iloc[0]}")
    ids = list(counts.index)
    rewards = torch.tensor([groups.get_group(i).to_list() for i in ids], dtype=torch.float64)
    return pd.DataFrame(
        {
            "id": ids,
            "vstar": vstar_estimate(rewards, beta1).tolist(),
            "n_samples": counts.to_list(),
            "n_correct": (rewards > 0.5).sum(dim=-1).tolist(),
            "mean_reward": rewards.mean(dim=-1).tolist(),
        }
    )
