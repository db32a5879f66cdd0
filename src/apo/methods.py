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


@register_method("grpo", "GRPO", samples=lambda s: s["grpo"]["group_size"], settings=("grpo",), needs_old_logp=True)
def grpo_micro_batch_loss(batch: MicroBatch, grpo: dict):
    from apo.losses import group_advantages, grpo_loss

    adv = group_advantages(batch.rewards.view(-1, grpo["group_size"])).flatten()
    return grpo_loss(batch.logp, batch.old_logp, batch.ref_logp, batch.mask, adv, grpo["clip_eps"], grpo["kl_coef"],
                     batch.loss_agg, batch.tokens)


@register_method("rebel", "REBEL", samples=2, settings=("rebel",), needs_old_logp=True)
def rebel_micro_batch_loss(batch: MicroBatch, rebel: dict):
    from apo.losses import rebel_loss

    return rebel_loss(batch.logp, batch.old_logp, batch.mask, batch.rewards, rebel["eta"])


@register_method("ppo", "PPO", samples=1, settings=("ppo",), needs_old_logp=True, critic=True)
def ppo_micro_batch_loss(batch: MicroBatch, ppo: dict):
    from apo.losses import ppo_loss

    return ppo_loss(batch.logp, batch.old_logp, batch.mask, batch.advantages, batch.values, batch.old_values, batch.returns,
                    ppo["clip_eps"], ppo["value_clip"], batch.loss_agg, batch.tokens)
