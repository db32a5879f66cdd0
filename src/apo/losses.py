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


# --------------------------------------------------------------------------- baselines
# Pure loss functions for the paper's comparison (apo-method.md, "Baselines"). The trainer
# does not dispatch to them yet (it needs G or 2 samples per prompt); they are pinned by
# unit tests so that integration changes nothing in the maths.


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage: (r - mean_group) / (std_group + eps) over a [prompts, G] reward table.

    The std is the unbiased sample std (as torch.std); a group with equal rewards gets 0.
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """GRPO: clipped importance-ratio objective with a group-normalised advantage, plus an
    optional KL penalty to the reference (the k3 estimator, exp(q) - q - 1 with
    q = log pi_ref - log pi), averaged over each response's tokens, then over responses.

        L = mean_b [ (1/|y_b|) sum_t ( -min(rho_t A_b, clip(rho_t, 1-eps, 1+eps) A_b)
                                       + kl_coef * k3_t ) ],   rho_t = pi / pi_old

    Args: logp, old_logp, ref_logp, mask [B, T]; advantages [B] (one per response).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    q = ref_logp - logp
    k3 = torch.exp(q) - q - 1
    per_token = -surrogate + kl_coef * k3
    lengths = mask.sum(dim=-1).clamp(min=1)
    loss = (masked_sum(per_token, mask) / lengths).mean()
    clipped = ((ratio - 1).abs() > clip_eps).float()
    stats = {
        "clip_frac": (masked_sum(clipped, mask).sum() / mask.sum().clamp(min=1)).item(),
        "kl_k3": (masked_sum(k3.detach(), mask) / lengths).mean().item(),
    }
    return loss, stats


def rebel_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, dict]:
    """REBEL: two responses per prompt, regress the scaled difference of their sequence
    log-ratios to the previous policy onto their reward difference.

        L = mean_x ( (1/eta) * [ log pi(y1)/pi_old(y1) - log pi(y2)/pi_old(y2) ]
                     - (r(y1) - r(y2)) )^2

    Args: logp, old_logp, mask [2P, T] with the pair of prompt p in rows 2p and 2p+1;
    rewards [2P].
    """
    seq = masked_sum(logp - old_logp, mask).view(-1, 2)
    r = rewards.view(-1, 2)
    residual = (seq[:, 0] - seq[:, 1]) / eta - (r[:, 0] - r[:, 1])
    loss = residual.pow(2).mean()
    return loss, {"residual_abs": residual.detach().abs().mean().item()}
