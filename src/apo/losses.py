"""Policy losses as small pure tensor functions (one per method). docs/method.md states each
formula and why (sections 3 and 4).

Shapes: B = responses in the (micro-)batch. Every function returns a scalar loss to
minimise and a dict of detached statistics for logging.
"""

from __future__ import annotations

from typing import Callable

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
                     - (r(x,y) - V*(x)) )^2

    (Lee et al. 2025, arXiv 2505.20686, stage 2; docs/method.md, section 3; the authors' code:
    ZhaolinGao/A-PO, verl/trainer/apo/core_algos.py, compute_policy_loss, lines 163-177.)

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
# The paper's comparison (arXiv 2505.20686, section 5): GRPO, REBEL and PPO, each pinned by
# unit tests on hand-computed values.


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token (Schulman et al. 2017, eq. 7), as a loss:

        -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t),   rho_t = pi(y_t) / pi_old(y_t)

    `advantages` broadcasts against logp ([B, 1] for one advantage per response, [B, T]
    per token). Returns (per-token loss [B, T], ratio [B, T]).
    """
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    return -surrogate, ratio


def seq_mean_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each response's tokens, then over responses (long answers weigh no more)."""
    return (masked_sum(values, mask) / mask.sum(dim=-1).clamp(min=1)).mean()


def token_mean(values: torch.Tensor, mask: torch.Tensor, tokens: float | None = None) -> torch.Tensor:
    """Sum over every response token of the micro-batch, divided by `tokens`.

    verl's default aggregation is the mean over all tokens of a mini-batch. A micro-batch is
    one of several whose losses are averaged (gradient accumulation, data parallel), so the
    trainer passes `tokens` = the mini-batch's response tokens / number of micro-batches in
    it; the average of the micro-batch losses is then exactly the mini-batch token mean.
    Without `tokens`, the micro-batch's own token count.
    """
    denom = mask.sum().clamp(min=1) if tokens is None else tokens
    return masked_sum(values, mask).sum() / denom


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, tokens: float | None = None) -> torch.Tensor:
    """Per-token losses [B, T] to a scalar: "token_mean" (verl's default) or
    "seq_mean_token_mean" (each response's token mean, then the mean over responses)."""
    if mode == "token_mean":
        return token_mean(values, mask, tokens)
    if mode == "seq_mean_token_mean":
        return seq_mean_token_mean(values, mask)
    raise ValueError(f"unknown loss aggregation {mode!r} (train.loss_agg)")


def clip_fraction(ratio: torch.Tensor, mask: torch.Tensor, clip_eps: float) -> float:
    """Share of response tokens whose ratio lies outside [1 - eps, 1 + eps]."""
    clipped = ((ratio.detach() - 1).abs() > clip_eps).float()
    return (masked_sum(clipped, mask).sum() / mask.sum().clamp(min=1)).item()


def ratio_deviation(ratio: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |rho_t - 1| over response tokens: 0 on the first mini-batch of a batch (pi = pi_old),
    how far the policy has moved from pi_old on the later ones."""
    return (masked_sum((ratio.detach() - 1).abs(), mask).sum() / mask.sum().clamp(min=1)).item()


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage: (r - mean_group) / (std_group + eps) over a [prompts, G] reward table.

    The std is the unbiased sample std (as torch.std); a group with equal rewards gets 0.
    """
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, bound: float = 10.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) (Schulman 2020), clamped to [-bound, bound]
    as verl's `low_var_kl` does (ZhaolinGao/A-PO, verl/trainer/ppo/core_algos.py:264-268), so
    that one token whose reference log-prob collapses cannot dominate the loss:

        k3_t = clamp(exp(q_t) - q_t - 1, -bound, bound),   q_t = log pi_ref(y_t) - log pi(y_t)
    """
    q = ref_logp - logp
    return torch.clamp(torch.exp(q) - q - 1, min=-bound, max=bound)


def rebel_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, dict]:
    """REBEL (Gao et al. 2024): two responses per prompt; regress the difference of their
    sequence log-ratios to the policy that sampled them onto eta times their reward difference,
    in the form of the REBEL authors' code (ZhaolinGao/REBEL, src/tldr/rebel.py, line 776):

        L = mean_x ( [ log pi(y1)/pi_old(y1) - log pi(y2)/pi_old(y2) ] - eta * (r(y1) - r(y2)) )^2

    eta is a step size: each iteration moves pi towards pi_old * exp(eta * r).

    Args: logp, old_logp, mask [2P, T] with the pair of prompt p in rows 2p and 2p+1;
    rewards [2P].
    """
    seq = masked_sum(logp - old_logp, mask).view(-1, 2)
    r = rewards.view(-1, 2)
    residual = (seq[:, 0] - seq[:, 1]) - eta * (r[:, 0] - r[:, 1])
    loss = residual.pow(2).mean()
    return loss, {"residual_abs": residual.detach().abs().mean().item()}


def ppo_token_rewards(
    rewards: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """PPO's per-token reward for RLHF: a KL penalty on every token, the sequence reward on
    the last response token (Ouyang et al. 2022, eq. 2):

        r_t = -kl_coef * (log pi_old(y_t) - log pi_ref(y_t)) + [t = |y| - 1] * r(x, y)

    Args: rewards [B]; old_logp, ref_logp, mask [B, T] (right-padded). Returns [B, T], zero
    on padding.
    """
    token_rewards = -kl_coef * (old_logp - ref_logp) * mask
    last = (mask.sum(dim=-1).long() - 1).clamp(min=0)
    return token_rewards.scatter_add(-1, last.unsqueeze(-1), rewards.unsqueeze(-1).to(token_rewards.dtype))


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), backwards over each
    response, with V = 0 after its last token:

        delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lam * A_{t+1},
        R_t = A_t + V_t (the critic's regression target)

    Args: token_rewards, values, mask [B, T], right-padded. Returns (advantages, returns),
    both [B, T] and zero on padding.
    """
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        # padding has r = V = 0, so the recursion carries zeros until the last real token
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries of the whole batch, zero on padding: PPO
    normalises its advantages over the batch. With data parallelism a process holds a slice of
    the batch; `reduce` sums a tensor over the processes so that every process whitens with the
    batch's statistics, as verl does on its driver. The variance is the unbiased one, as in
    verl's `masked_var` (ZhaolinGao/A-PO, verl/utils/torch_functional.py:112-127):

        mean = sum_m x / N,   var = sum_m (x - mean)^2 / (N - 1),   N = sum mask
    """
    reduce = reduce or (lambda x: x)
    n, total = reduce(torch.stack([mask.sum(), masked_sum(values, mask).sum()]).double())
    mean = total / n.clamp(min=1)
    squares = reduce(masked_sum((values - mean).pow(2), mask).sum().double().reshape(1))[0]
    var = squares / (n - 1).clamp(min=1)
    return ((values - mean) * torch.rsqrt(var + eps)).to(values.dtype) * mask


def ppo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    clip_eps: float = 0.2,
    value_clip: float = 0.5,
    loss_agg: str = "token_mean",
    tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """PPO with a learned critic: the clipped policy objective on per-token GAE advantages
    plus the clipped value regression onto the returns, each aggregated over tokens by
    `loss_agg` (see `aggregate`):

        L = agg_{b,t} [ w_t * -min(rho_t A_t, clip(rho_t, 1 +- eps) A_t) ]
            + agg_{b,t} [ 1/2 max((V_t - R_t)^2, (clip(V_t, V_old_t +- value_clip) - R_t)^2) ]

    The policy and the critic are separate networks, so each term only moves its own.
    w_t: the truncated importance weights to the engine (`tis_weights`), 1 without them.
    Args: all [B, T]; values with grad from the critic, the rest detached.
    """
    pg, ratio = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    if weights is not None:
        pg = pg * weights
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    vf = 0.5 * torch.maximum((values - returns).pow(2), (clipped_values - returns).pow(2))
    policy_loss, value_loss = aggregate(pg, mask, loss_agg, tokens), aggregate(vf, mask, loss_agg, tokens)
    stats = {
        "clip_frac": clip_fraction(ratio, mask, clip_eps),
        "ratio_dev": ratio_deviation(ratio, mask),
        "value_loss": value_loss.item(),
        "value_mean": (masked_sum(values.detach(), mask).sum() / mask.sum().clamp(min=1)).item(),
    }
    return policy_loss + value_loss, stats


# --------------------------------------------------------------------------- GRPO variants
# The forms of GRPO the peers select by name (docs/method.md, section 4, "GRPO variants"):
# Dr. GRPO (Liu et al. 2025), DAPO (Yu et al. 2025), GSPO (Zheng et al. 2025), and the
# truncated importance-sampling correction for the engine's log-probs (TIS, Yao et al. 2025).


def centred_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO's advantage: r - mean_group over a [prompts, G] reward table, without the
    division by the group's std (TRL scale_rewards="none"; verl norm_adv_by_std_in_grpo=False)."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


def seq_mean_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
    """Dr. GRPO's aggregation: each response's token sum divided by a constant, the maximum
    response length, then the mean over responses (TRL loss_type="dr_grpo":
    sum / (B * max_completion_length)). A long response weighs by its length, as in the
    policy gradient itself, and the constant keeps the scale from changing with the batch."""
    return masked_sum(values, mask).sum() / (mask.shape[0] * max_len)


def aggregate_variant(values: torch.Tensor, mask: torch.Tensor, mode: str, tokens: float | None,
                      max_len: int | None) -> torch.Tensor:
    """`aggregate` plus Dr. GRPO's "seq_mean_token_sum_norm" (which needs `max_len`)."""
    if mode == "seq_mean_token_sum_norm":
        return seq_mean_token_sum_norm(values, mask, max_len)
    return aggregate(values, mask, mode, tokens)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level importance ratio in log space, spread over the tokens ([B, T]):

        log s_i = (1/|y_i|) sum_t log(pi(y_t) / pi_old(y_t))     (GSPO, Zheng et al. 2025)

    in the form of its token version, log s_i,t = sg[log s_i] + log pi(y_t) - sg[log pi(y_t)]:
    every token of a response carries the value s_i and the gradient s_i * grad log pi(y_t)
    (verl compute_policy_loss_gspo; TRL importance_sampling_level="sequence" has the same
    value and, under the sequence mean, the same gradient)."""
    seq = masked_sum(logp - old_logp, mask) / mask.sum(dim=-1).clamp(min=1)
    return logp - logp.detach() + seq.detach().unsqueeze(-1)


def decoupled_clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                                clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate with DAPO's decoupled range (clip-higher, Yu et al. 2025):

        -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A),   rho_t = exp(log_ratio)

    (verl clip_ratio_low / clip_ratio_high; TRL epsilon / epsilon_high). Equal bounds give
    `clipped_surrogate`. Returns (per-token loss [B, T], ratio [B, T])."""
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages)
    return -surrogate, ratio


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward: 0 up to max_len - buffer tokens,
    then falling linearly to -factor at max_len:

        R_len(y) = min(0, -(|y| - (max_len - buffer)) / buffer * factor)

    (Yu et al. 2025, eq. 13; verl reward_model.overlong_buffer.len / penalty_factor).
    buffer 0 turns it off."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    exceed = lengths.float() - (max_len - buffer)
    return torch.clamp(-exceed / buffer * factor, max=0.0)


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling between the trainer and the engine that sampled:

        w_t = min(pi_old(y_t) / pi_engine(y_t), C),

    detached, one per token; a token the engine gave no log-prob for (NaN) gets weight 1.
    The per-token policy loss is multiplied by w_t (Yao et al. 2025; verl
    rollout_is: token with rollout_is_threshold C; TRL vllm_importance_sampling_mode
    "token_truncate")."""
    w = torch.exp(old_logp.detach() - engine_logp).clamp(max=cap)
    return torch.where(torch.isnan(engine_logp), torch.ones_like(w), w)


def logprob_gap(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
    """|log pi_engine(y_t) - log pi_trainer(y_t)| over the response tokens the engine scored
    (NaN where it did not): (sum, token count, max), so that several micro-batches combine
    into an exact mean."""
    known = mask.bool() & ~torch.isnan(engine_logp)
    diff = (engine_logp - trainer_logp.detach()).abs()[known]
    if diff.numel() == 0:
        return 0.0, 0.0, 0.0
    return diff.sum().item(), float(diff.numel()), diff.max().item()


def grpo_variant_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    loss_agg: str = "token_mean",
    tokens: float | None = None,
    max_len: int | None = None,
    ratio_level: str = "token",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """GRPO and its variants in one formula: the clipped surrogate on the token or sequence
    (GSPO) ratio, with a decoupled upper clip (DAPO), optionally weighted per token (TIS),
    plus the k3 KL penalty, aggregated by `loss_agg` (Dr. GRPO: "seq_mean_token_sum_norm"):

        L = agg_{b,t} [ w_t * -min(rho A_b, clip(rho, 1 - eps, 1 + eps_high) A_b) + kl_coef * k3_t ]

    with rho = pi(y_t)/pi_old(y_t) (ratio_level "token") or GSPO's s_b ("sequence"). With
    eps_high None, ratio_level "token" and no weights it is GRPO's loss.
    Args: logp, old_logp, ref_logp (None at kl_coef 0: no penalty, no kl_k3), mask [B, T];
    advantages [B]; weights [B, T] or None.
    """
    if ratio_level == "sequence":
        log_ratio = sequence_log_ratio(logp, old_logp, mask)
    elif ratio_level == "token":
        log_ratio = logp - old_logp
    else:
        raise ValueError(f"unknown importance ratio level {ratio_level!r} (expected token or sequence)")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg, ratio = decoupled_clipped_surrogate(log_ratio, advantages.unsqueeze(-1), clip_eps, high)
    if weights is not None:
        pg = pg * weights
    outside = (ratio.detach() < 1 - clip_eps) | (ratio.detach() > 1 + high)
    stats = {
        "clip_frac": (masked_sum(outside.float(), mask).sum() / mask.sum().clamp(min=1)).item(),
        "ratio_dev": ratio_deviation(ratio, mask),
    }
    if ref_logp is None:  # not scored: kl_coef is 0 and the KL not measured (train.measure_kl)
        if kl_coef:
            raise ValueError(f"kl_coef {kl_coef} needs the reference's log-probs")
        return aggregate_variant(pg, mask, loss_agg, tokens, max_len), stats
    k3 = k3_kl(logp, ref_logp)
    stats["kl_k3"] = seq_mean_token_mean(k3.detach(), mask).item()
    return aggregate_variant(pg + kl_coef * k3, mask, loss_agg, tokens, max_len), stats
