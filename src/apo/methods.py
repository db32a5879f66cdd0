"""The training methods, one registry entry each (in the style of verl's policy-loss registry).

An entry is everything outside its loss that the planner, the trainer, the memory plan, the
report and the tools know of a method: its display name, how many responses it samples per
prompt, which `train.*` settings only it reads and which of them a sweep may list, whether it
reads V*, needs the log-probs of the policy that sampled (pi_old) or trains a critic, what it
computes over the whole batch before its update, and its loss. Adding a method is one loss
function in `apo.losses`, one `register_method` entry here, which reads the loss's inputs off
a `MicroBatch`, and its block in the config schema; no other module names a method
(tests/test_architecture.py).
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
    ref_logp: torch.Tensor | None  # [B, T] under the frozen reference (None: not scored, Method.reads_reference)
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


def _never(train_settings: dict) -> bool:
    return False


def _always(train_settings: dict) -> bool:
    return True


@dataclass(frozen=True)
class Method:
    name: str
    display: str
    loss: Callable[..., tuple[torch.Tensor, dict]]  # (MicroBatch, **hyperparameters)
    samples: Callable[[dict], int]  # train settings -> responses per prompt
    settings: tuple[str, ...]  # train.* keys only this method reads
    sweepable: tuple[str, ...] = ()  # of those, the dotted keys a sweep may list (lr: every method's)
    reads_vstar: bool = False
    needs_old_logp: bool = False
    # train settings -> whether pi_old is scored before the update even with one mini-batch
    # (where `prepare` reads it; otherwise the update reads it off its own forward pass)
    old_logp_first: Callable[[dict], bool] = _never
    # train settings -> whether the loss (or `prepare`) reads the reference's log-probs; where
    # it does not, they are scored only for the KL metric (train.measure_kl)
    reads_reference: Callable[[dict], bool] = _always
    # A critic trains beside the policy (its learning rate: train.<name>.critic_lr), scored
    # before the update (MicroBatch.old_values) and in it (MicroBatch.values).
    critic: bool = False
    # (rollout, train settings, reduce) -> {MicroBatch field: [B, T] tensor}: what the method
    # computes over the whole batch before its update. The rollout holds the batch's rewards,
    # mask, ref_logp, old_logp (where scored) and old_values (with a critic); `reduce(x)` sums
    # x over the processes.
    prepare: Callable[..., dict] | None = None
    group_filter: bool = False  # GRPO family: its block's dynamic_sampling may drop all-equal groups
    variant_of: str | None = None  # one loss and another block's settings: the tools time the family once
    peer: str | None = None  # TRL's trainer of this method (`apo bench-peers` times the two side by side)

    def bind(self, train_settings: dict) -> Callable[[MicroBatch], tuple[torch.Tensor, dict]]:
        """The loss with this method's hyperparameters read from the settings once."""
        return functools.partial(self.loss, **{k: train_settings[k] for k in self.settings})

    def critic_lr(self, train_settings: dict) -> float:
        return train_settings[self.name]["critic_lr"]


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


def sweepable_keys() -> tuple[str, ...]:
    """The method-only keys a sweep may list, as dotted train.* paths, in registry order."""
    return tuple(dict.fromkeys(k for m in METHODS.values() for k in m.sweepable))


def timed_by_default() -> list[str]:
    """The methods the tools time when not told which: the registry's order (the reference
    first), one of each family."""
    return [m.name for m in METHODS.values() if m.variant_of is None]


# The paper's method, registered first: the tools' and the report's ratios are to it.
REFERENCE = "apo"


@register_method(REFERENCE, "A*-PO", samples=1, settings=("beta2",), sweepable=("beta2",), reads_vstar=True,
                 peer="TRL A2POTrainer")
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
                    sweepable=(f"{_name}.group_size",), needs_old_logp=True, group_filter=True,
                    reads_reference=lambda s, _n=_name: s[_n]["kl_coef"] > 0,
                    variant_of=None if _name == "grpo" else "grpo",
                    peer="TRL GRPOTrainer" if _name == "grpo" else None)(grpo_family_loss)


@register_method("rebel", "REBEL", samples=2, settings=("rebel",), sweepable=("rebel.eta",), needs_old_logp=True,
                 reads_reference=_never)
def rebel_micro_batch_loss(batch: MicroBatch, rebel: dict):
    from apo.losses import rebel_loss

    return rebel_loss(batch.logp, batch.old_logp, batch.mask, batch.rewards, rebel["eta"])


def ppo_prepare(rollout, train_settings: dict, reduce) -> dict:
    """PPO's per-token rewards (the KL penalty to the reference where kl_coef > 0) and GAE over
    the critic's values: the advantages, whitened over the whole batch, and the returns."""
    from apo.losses import gae, masked_whiten, ppo_token_rewards

    p, r = train_settings["ppo"], rollout
    kl_logp = r.old_logp if p["kl_coef"] > 0 else r.ref_logp  # kl_coef 0: the penalty vanishes
    token_rewards = ppo_token_rewards(r.rewards, kl_logp, r.ref_logp, r.mask, p["kl_coef"])
    advantages, returns = gae(token_rewards, r.old_values, r.mask, p["gamma"], p["lam"])
    return {"advantages": masked_whiten(advantages, r.mask, reduce=reduce), "returns": returns}


@register_method("ppo", "PPO", samples=1, settings=("ppo",), needs_old_logp=True, critic=True, prepare=ppo_prepare,
                 old_logp_first=lambda s: s["ppo"]["kl_coef"] > 0)
def ppo_micro_batch_loss(batch: MicroBatch, ppo: dict):
    from apo.losses import ppo_loss

    return ppo_loss(batch.logp, batch.old_logp, batch.mask, batch.advantages, batch.values, batch.old_values, batch.returns,
                    ppo["clip_eps"], ppo["value_clip"], batch.loss_agg, batch.tokens, _tis(batch, ppo.get("tis_cap")))
