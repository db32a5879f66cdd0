"""Scoring sampled responses with a model: per-token log-probs (and entropy) under the policy
or the reference, per-token values under PPO's critic.

Sequences are prompt + response, right-padded; every result is aligned so that column t of
a [B, T] tensor belongs to response token y_t (left-aligned responses, zero on padding).
"""

from __future__ import annotations

import torch


def accepts_logits_to_keep(model) -> bool:
    """Whether `model` (or the module a DDP/DeepSpeed wrapper holds) can compute its logits at
    some positions only (transformers' `logits_to_keep`, which its causal LMs take)."""
    import inspect

    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _forward(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, window: bool = False):
    """Run prompt + response sequences, right-padded, through `model`; returns its output, the
    input ids and the first position its output covers.

    With `window` (a causal LM that takes `logits_to_keep`), the logits are computed from the
    last position of the shortest prompt on, the first that predicts a response token: the
    output layer and the softmax then skip the shared prompt prefix, which on the demo is over
    half of every sequence, and with a real model's 150k-entry vocabulary the largest tensor
    of the step."""
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
    ids, attn = ids.to(device), attn.to(device)
    if not window:
        return model(input_ids=ids, attention_mask=attn), ids, 0
    first = max(min(map(len, prompts)) - 1, 0)
    return model(input_ids=ids, attention_mask=attn, logits_to_keep=width - first), ids, first


def response_mask(responses: list[list[int]], device) -> torch.Tensor:
    """[B, T] 1 on each response's tokens, T the longest response."""
    mask = torch.zeros((len(responses), max(map(len, responses))), device=device)
    for b, r in enumerate(responses):
        mask[b, : len(r)] = 1
    return mask


def _response_positions(per_position: torch.Tensor, prompts, responses, first: int = 0):
    """Pick, for each response token y_t, the value at the position that predicts it
    (len(prompt) - 1 + t), aligned left so that [B, T] is as small as possible.

    Args: per_position [B, L - 1 - first], column i for position first + i, which predicts
    token first + i + 1. Returns (out, mask) [B, T].
    """
    mask = response_mask(responses, per_position.device)
    out = per_position.new_zeros(mask.shape)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        start = len(p) - 1 - first
        out[b, : len(r)] = per_position[b, start : start + len(r)]
    return out, mask


def token_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, temperature: float = 1.0):
    """Per-token log pi(y_t | x, y_<t) of each response, right-padded to [B, T].

    The logits are divided by the sampling temperature (as verl's actor does), so the
    log-probs are those of the distribution the responses were drawn from.
    Returns (logp [B, T], mask [B, T]) where mask is 1 on response tokens.
    """
    logp, _, mask = token_logprobs_and_entropy(model, prompts, responses, pad_id, temperature, entropy=False)
    return logp, mask


def token_logprobs_and_entropy(
    model, prompts, responses, pad_id: int, temperature: float = 1.0, entropy: bool = True
):
    """`token_logprobs` plus, when `entropy`, the policy's entropy H(pi(. | x, y_<t)) at each
    response position (None otherwise). Returns (logp, entropy, mask), each [B, T].

    log_softmax is taken at the target only (gather minus logsumexp) and the entropy from one
    softmax, so no [B, L, V] log-prob tensor is ever built, let alone twice.
    """
    output, ids, first = _forward(model, prompts, responses, pad_id, window=accepts_logits_to_keep(model))
    logits = output.logits[:, :-1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    # the target first: the other order keeps one more [B, L, V] buffer alive in the backward
    target = logits.gather(-1, ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1)
    lse = logits.logsumexp(-1)
    logp = target - lse
    logp, mask = _response_positions(logp, prompts, responses, first)
    if not entropy:
        return logp, None, mask
    # H = logsumexp(z) - sum_v softmax(z)_v z_v
    ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, _response_positions(ent, prompts, responses, first)[0], mask


def token_values(critic, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """PPO's critic: V(x, y_<t), the value of the state in which y_t is chosen, [B, T]."""
    output, _, _ = _forward(critic, prompts, responses, pad_id)
    return _response_positions(output.logits[:, :-1, 0].float(), prompts, responses)


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B_i, T_i] tensors along B, zero-padding every T_i to the largest."""
    width = max(x.shape[1] for x in tensors)
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in tensors])


def score_batch(fn, model, prompts, responses, parts: list[slice], pad_id: int):
    """`fn` (e.g. token_logprobs or token_values) over a batch, one micro-batch (`parts`) at a
    time, without gradients; returns (scores, mask), each one zero-padded [B, T] tensor."""
    with torch.no_grad():
        outs = [fn(model, prompts[part], responses[part], pad_id) for part in parts]
    return pad_cat([x for x, _ in outs]), pad_cat([m for _, m in outs])
