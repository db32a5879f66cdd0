"""Policy losses as small pure tensor functions (one per method).

Shapes: B = responses in the (micro-)batch. Every function returns a scalar loss to
minimise and a dict of detached statistics for logging.
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last (token) dimension, counting only positions where mask is 1."""
    return (values * mask).sum(dim=-1)


def apo_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    vstar: torch.Tensor,
    beta2: float,
) -> tuple[torch.Tensor, dict]:
    """A*-PO stage 2: least-squares regression onto the optimal advantage.

        L = mean_b ( beta2 * sum_t [log pi(y_t|x,y_<t) - log pi_ref(y_t|x,y_<t)]
                     - (r(x,y) - V*(x)) )^2                  (apo-method.md, stage 2)

    The log-ratio is summed over response tokens (a sequence log-ratio), not averaged.

    Args:
        logp, ref_logp: [B, T] per-token log-probs of the sampled response under the policy
            (with grad) and the frozen reference.
        mask: [B, T] 1 on response tokens, 0 on padding.
        rewards, vstar: [B] reward of each response and V* of its prompt.
    """
    log_ratio = masked_sum(logp - ref_logp, mask)  # [B]
    advantage = rewards - vstar  # A*(x, y) = r - V*(x)
    residual = beta2 * log_ratio - advantage
    loss = residual.pow(2).mean()
    stats = {
        "log_ratio": log_ratio.detach().mean().item(),
        "advantage": advantage.mean().item(),
        "residual_abs": residual.detach().abs().mean().item(),
    }
    return loss, stats
