"""The training methods, one registry entry each (in the style of verl's policy-loss registry).

An entry says what the trainer, the content addresses and the report need to know of a
method: its display name, how many responses it samples per prompt, whether it reads V*,
whether it needs the log-probs of the policy that sampled (pi_old) or a critic, which
`train.*` settings only it reads, and its loss. Adding a method is one loss function in
`apo.losses` and one `register_method` entry here, which reads the loss's inputs off a
`MicroBatch`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

# The workflow's planner reads this registry (settings.py) on every `snakemake` call: torch and
# the losses are imported only where a loss runs.
if TYPE_CHECKING:
    import torch


@dataclass
class MicroBatch:
    """What a loss sees of one micro-batch of B responses (flattened prompt-major, so the
    responses of one prompt are consecutive). [B, T] tensors are right-padded per `mask`."""

    logp: torch.Tensor  # [B, T] under the policy being trained (with grad)
    old_logp: torch.Tensor  # [B, T] under the policy that sampled (pi_old), detached
    ref_logp: torch.Tensor  # [B, T] under the frozen reference
    mask: torch.Tensor  # [B, T] 1 on response tokens
    rewards: torch.Tensor  # [B]
    vstar: torch.Tensor  # [B] V* of each response's prompt (NaN for methods without V*)
    tokens: float  # the token_mean denominator for this micro-batch (see losses.token_mean)
    loss_agg: str  # train.loss_agg
    values: torch.Tensor | None = None  # PPO: [B, T] critic values (with grad)
    old_values: torch.Tensor | None = None  # PPO: [B, T] before the update
    advantages: torch.Tensor | None = None  # PPO: [B, T] GAE, whitened over the batch
    returns: torch.Tensor | None = None  # PPO: [B, T]
    engine_logp: torch.Tensor | None = None  # [B, T] the engine's log-probs of the sampled tokens (NaN: none)
    max_len: int | None = None  # train.max_new_tokens (Dr. GRPO's constant, DAPO's overlong buffer)


@dataclass(frozen=True)
class Method:
    name: str
    display: str
    loss: Callable[..., tuple[torch.Tensor, dict]]  # (MicroBatch, **hyperparameters)
    samples: Callable[[dict], int]  # train settings -> responses per prompt
    settings: tuple[str, ...]  # train.* keys only this method reads
    reads_vstar: bool = False
    needs_old_logp: bool = False
    critic: bool = False
    group_filter: bool = False  # GRPO family: its block's dynamic_sampling may drop all-equal groups

    def bind(self, train_settings: dict) -> Callable[[MicroBatch], tuple[torch.Tensor, dict]]:
        """The loss with this method's hyperparameters read from the settings once."""
        return functools.partial(self.loss, **{k: train_settings[k] for k in self.settings})


METHODS: dict[str, Method] = {}


def register_method(name: str, display: str, samples, settings: tuple[str, ...], **flags):
    """Decorator: register a loss function as method `name`."""

    def wrap(loss):
        METHODS[name] = Method(name, display, loss, samples if callable(samples) else (lambda s: samples),
                               settings, **flags)
        return loss

    return wrap


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown training method {name!r} (known: {sorted(METHODS)})") from None


def method_only_keys() -> set[str]:
    """train.* keys that some method alone reads (its block or hyperparameter)."""
    return {k for m in METHODS.values() for k in m.settings}


@register_method("apo", "A*-PO", samples=1, settings=("beta2",), reads_vstar=True)
def apo_micro_batch_loss(batch: MicroBatch, beta2: float):
    from apo.losses import apo_loss

    return apo_loss(batch.logp, batch.ref_logp, batch.mask, batch.rewards, batch.vstar, beta2)


# GRPO and the variants the peers select by name: one loss (losses.grpo_variant_loss), each
# name with its own block of train.* settings, whose schema defaults are that variant's recipe
# (docs/method.md, "GRPO variants").
GRPO_FAMILY = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO", "gspo": "GSPO"}


def _tis(batch: MicroBatch, cap: float | None):
    """Truncated importance weights to the engine's log-probs, where asked for and given."""
    if cap is None or batch.engine_logp is None:
        return None
    from apo.losses import tis_weights

    return tis_weights(batch.old_logp, batch.engine_logp, cap)


def grpo_family_loss(batch: MicroBatch, **block: dict):
    """The loss of a GRPO-family method; `block` is its one settings block (train.<name>)."""
    from apo.losses import centred_advantages, grpo_variant_loss, group_advantages, overlong_penalty

    (opts,) = block.values()
    rewards = batch.rewards
    if opts.get("overlong_buffer", 0):
        rewards = rewards + overlong_penalty(batch.mask.sum(-1), batch.max_len, opts["overlong_buffer"],
                                             opts["overlong_penalty"])
    table = rewards.view(-1, opts["group_size"])
    adv = (group_advantages(table) if opts.get("scale_rewards", True) else centred_advantages(table)).flatten()
    return grpo_variant_loss(
        batch.logp, batch.old_logp, batch.ref_logp, batch.mask, adv, opts["clip_eps"], opts.get("clip_eps_high"),
        opts["kl_coef"], opts.get("loss_agg") or batch.loss_agg, batch.tokens, batch.max_len,
        opts.get("ratio", "token"), _tis(batch, opts.get("tis_cap")),
    )


for _name, _display in GRPO_FAMILY.items():
    register_method(_name, _display, samples=lambda s, _n=_name: s[_n]["group_size"], settings=(_name,),
                    needs_old_logp=True, group_filter=True)(grpo_family_loss)


@register_method("rebel", "REBEL", samples=2, settings=("rebel",), needs_old_logp=True)
def rebel_micro_batch_loss(batch: MicroBatch, rebel: dict):
    from apo.losses import rebel_loss

    return rebel_loss(batch.logp, batch.old_logp, batch.mask, batch.rewards, rebel["eta"])


@register_method("ppo", "PPO", samples=1, settings=("ppo",), needs_old_logp=True, critic=True)
def ppo_micro_batch_loss(batch: MicroBatch, ppo: dict):
    from apo.losses import ppo_loss

    return ppo_loss(batch.logp, batch.old_logp, batch.mask, batch.advantages, batch.values, batch.old_values, batch.returns,
                    ppo["clip_eps"], ppo["value_clip"], batch.loss_agg, batch.tokens, _tis(batch, ppo.get("tis_cap")))
