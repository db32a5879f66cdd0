"""Stage 2: on-policy training of A*-PO (one generation per prompt) and, on equal footing, the
baselines of the paper's comparison (apo.methods: GRPO samples a group per prompt, REBEL a
pair, PPO one response scored by a learned critic).

The recipe is the authors' (arXiv 2505.20686; ZhaolinGao/A-PO, scripts/apo_math.sh and
verl/workers/actor/dp_actor_apo.py): float32 master weights and AdamW state with bfloat16
compute, and per generation step

  1. rollout: take the next `batch_size` prompts (a fixed permutation per epoch), sample
     `samples(method)` responses per prompt from the current policy and grade them;
  2. score: log-probs under the frozen reference, and where the method needs them the
     log-probs of the sampling policy pi_old and (PPO) the critic's values and GAE;
  3. update: split the batch into mini-batches of `mini_batch_size` prompts, one optimizer
     step each (gradients accumulated over micro-batches of `micro_batch_size` prompts);
     loss = the method's loss - entropy_coef * entropy;
  4. push the new weights to the generation engine, log the step, and every
     `checkpoint_every` steps write an atomic checkpoint a rerun resumes from.

`train()` below runs these steps in order; each is a function of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from apo import methods, sharding, validate
from apo.checkpoint import latest_checkpoint, resume, save_checkpoint
from apo.generation import SamplingSettings, VLLMSettings, make_generator
from apo.io import atomic_path
from apo.job import output_name, verify_if_stage
from apo.losses import aggregate, logprob_gap
from apo.methods import MicroBatch
from apo.monitor import CollapseMonitor, peak_memory_mb
from apo.reward import Grader
from apo.scoring import response_mask, score_batch, token_logprobs, token_logprobs_and_entropy, token_values
from apo.vstar import training_data

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class TimeLimitReached(RuntimeError):
    """The job stopped, checkpointed, before its scheduler's time limit; the next job resumes."""


# What a stop before the limit leaves for the checkpoint and the exit: this many times the
# slowest step so far, and at least SAFETY_S.
STEP_MARGIN, SAFETY_S = 3.0, 300.0


def job_deadline(time_limit_min: float | None, environ=os.environ, now: float | None = None) -> float | None:
    """When this job will be stopped (seconds since the epoch), or None outside a scheduler.

    Under Slurm the job's end is SLURM_JOB_END_TIME where Slurm sets it, else the runtime the
    job asked for (resources.train.runtime) from now; a run outside Slurm has no limit."""
    if "SLURM_JOB_ID" not in environ:
        return None
    if environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(environ["SLURM_JOB_END_TIME"])
    return None if time_limit_min is None else (now or time.time()) + 60 * time_limit_min


def out_of_time(deadline: float | None, step_seconds: list[float], now: float) -> bool:
    """Whether another step and a checkpoint may not fit before the deadline."""
    if deadline is None or not step_seconds:
        return False
    return now + max(SAFETY_S, STEP_MARGIN * max(step_seconds)) > deadline


def clock(device: torch.device) -> float:
    """Wall time once this process's GPU has run what was queued: CUDA kernels run
    asynchronously, and without the wait a phase would be charged for the kernels of the one
    before it. The device is named: in a multi-GPU job each process waits for its own GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def claim_local_device(environ=os.environ) -> None:
    """Make this process's GPU (LOCAL_RANK, set by the launcher) its current CUDA device before
    anything touches CUDA, so that accelerate, FSDP's streams and the colocated engine all use
    the same GPU; one process per GPU in a multi-GPU job."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(environ.get("LOCAL_RANK", 0)))


def batch_indices(step: int, batch_size: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts of generation step `step`: a fresh permutation per epoch, batches never straddle
    an epoch boundary (the tail of an epoch that does not fill a batch is skipped, as the
    authors' DataLoader(drop_last=True) does)."""
    per_epoch = n_prompts // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size].tolist()


def with_epochs(settings: dict, n_prompts: int) -> dict:
    """The settings with `steps` = train.epochs x the full batches of `n_prompts` when epochs is
    set (the authors' total_epochs x len(dataloader), drop_last: ZhaolinGao/A-PO
    verl/trainer/apo/ray_trainer.py:316-320), else as they are."""
    if settings.get("epochs") is None:
        return settings
    return {**settings, "steps": settings["epochs"] * (n_prompts // settings["batch_size"])}


def batch_layout(settings: dict, world: int) -> tuple[int, int]:
    """(mini-batches per generation batch, micro-batches per mini-batch on each process)."""
    mini = settings.get("mini_batch_size") or settings["batch_size"]
    if settings["batch_size"] % mini:
        raise ValueError(f"train.batch_size ({settings['batch_size']}) must be a multiple of "
                         f"train.mini_batch_size ({mini})")
    if mini % (settings["micro_batch_size"] * world):
        raise ValueError(
            f"train.mini_batch_size ({mini}) must be a multiple of train.micro_batch_size "
            f"({settings['micro_batch_size']}) x {world} training processes"
        )
    return settings["batch_size"] // mini, mini // (settings["micro_batch_size"] * world)


# --------------------------------------------------------------------------- setup


@dataclass
class Trainer:
    """Everything the loop needs, built once by `setup`."""

    settings: dict
    method: methods.Method
    loss_fn: object
    accelerator: object
    world: int
    n_minis: int
    accum: int
    tokenizer: object
    policy: object
    reference: object
    optimizer: object
    scheduler: object
    critic: object | None
    critic_optimizer: object | None
    critic_scheduler: object | None
    generator: object
    data: pd.DataFrame
    prompt_ids: list
    sampling: SamplingSettings
    ckpt_root: Path
    gradient_checkpointing: bool
    validation: validate.ValidationSet | None = None
    fsdp: bool = False

    @property
    def trained(self) -> list:
        return [self.policy] if self.critic is None else [self.policy, self.critic]

    @property
    def parts(self) -> list:
        """(network, optimizer, LR schedule) of each trained network, as a checkpoint holds them."""
        nets = [(self.policy, self.optimizer, self.scheduler)]
        if self.critic is not None:
            nets.append((self.critic, self.critic_optimizer, self.critic_scheduler))
        return nets

    @property
    def sharded(self) -> dict:
        """The sharded networks and their optimizers by name, which a checkpoint stores in
        torch.distributed.checkpoint format (empty unless training under FSDP)."""
        if not self.fsdp:
            return {}
        nets = {"policy": (self.policy, self.optimizer)}
        if self.critic is not None:
            nets["critic"] = (self.critic, self.critic_optimizer)
        return nets


def check_distributed(settings: dict, distributed: str, world: int) -> None:
    """FSDP over several processes needs an engine that holds its own full weights: the hf
    engine samples from the local module, which FSDP shards (one process shards nothing)."""
    if distributed not in sharding.MODES:
        raise ValueError(f"{sharding.DISTRIBUTED_KEY}: unknown mode {distributed!r} (expected one of "
                         f"{', '.join(sharding.MODES)})")
    if distributed == "fsdp" and world > 1 and settings["backend"] == "hf":  # resolved at planning
        raise NotImplementedError(
            f"{sharding.DISTRIBUTED_KEY}: fsdp shards the policy, and the hf engine (generation.train_backend, or "
            "generation.backend) samples from the local module; use vllm (it holds its own full weights, synced after "
            f"every step), or {sharding.DISTRIBUTED_KEY}: ddp or deepspeed"
        )


def make_accelerator(settings: dict, accum: int):
    """Accelerate with bf16 autocast when train.compute_dtype is bfloat16: the prepared models
    keep float32 parameters (the master weights) and AdamW keeps float32 state, as the
    authors' FSDP mixed precision does. Under FSDP the trainer shards the networks itself
    (apo.sharding) and accelerate runs a plain multi-process setup around them."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(
        gradient_accumulation_steps=accum, mixed_precision="bf16" if settings["compute_dtype"] == "bfloat16" else "no"
    )
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise ValueError(
            "accelerate was launched with its own FSDP plugin; the trainer shards the networks itself: "
            f"launch with workflow/accelerate/fsdp.yaml and {sharding.DISTRIBUTED_KEY}: fsdp"
        )
    if kind == DistributedType.DEEPSPEED and methods.get(settings["method"]).critic:
        raise NotImplementedError(
            f"train.method {settings['method']} trains two networks (policy and critic), which accelerate's DeepSpeed "
            "integration needs one plugin each for; use resources.train.distributed: ddp or fsdp"
        )
    if kind == DistributedType.DEEPSPEED:  # no dataloader to read it from
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = settings["micro_batch_size"]
    return accelerator


def load_prompts(settings: dict, prompts_path: str, vstar_path: str | None, tokenizer):
    """The training prompts (joined to V* for A*-PO: the prompts of the filtered V* table, every
    other one accounted for by the V* stage) and their token ids."""
    data = training_data(prompts_path, vstar_path)
    if len(data) < settings["batch_size"]:
        raise ValueError(
            f"{len(data)} training prompts (after V* filtering), fewer than train.batch_size={settings['batch_size']}"
        )
    return data, [tokenizer(p, add_special_tokens=False)["input_ids"] for p in data["prompt"]]


def optimize(accelerator, model, settings: dict, lr: float, fsdp: bool = False):
    """AdamW (betas 0.9/0.999, as verl) on float32 parameters, and the LR schedule, which steps
    once per generation step (as verl's actor does) and is saved with every checkpoint.

    Under FSDP (`model` sharded by `load_models`) neither the model nor the optimizer goes
    through accelerate, whose checkpoints would save rank 0's shards only: the optimizer is
    stepped at the end of each mini-batch and saved by `sharding.save_sharded`."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings["weight_decay"], betas=(0.9, 0.999))
    scheduler = get_scheduler(settings["lr_schedule"], optimizer, num_warmup_steps=settings["warmup_steps"],
                              num_training_steps=settings["steps"])
    if not fsdp:
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, scheduler


def load_models(settings: dict, model_path: str, accelerator, gradient_checkpointing: bool, fsdp: bool = False):
    """Policy (float32 master weights), frozen reference (train.reference_dtype) and, for PPO,
    the critic: the reference architecture with a fresh scalar head (a one-label token
    classifier), trained by its own optimizer at its own rate.

    Under FSDP each network, the reference included, is sharded as soon as it is loaded: a
    process then holds one whole network in host memory at a time, not all of them."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    compute = getattr(torch, settings["compute_dtype"])

    def placed(model):
        return sharding.shard(model, compute, accelerator.device.type) if fsdp else model

    policy = placed(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, settings["reference_dtype"]))
    reference.requires_grad_(False).eval()
    reference = placed(reference) if fsdp else reference.to(accelerator.device)  # sharded: on its device
    critic = None
    if methods.get(settings["method"]).critic:
        # No dropout in the critic, as verl (ZhaolinGao/A-PO, verl/workers/fsdp_workers.py:587-588):
        # transformers gives the fresh head 0.1 when the config names none.
        critic = placed(AutoModelForTokenClassification.from_pretrained(
            model_path, config=critic_config(model_path), dtype=torch.float32))
    for model in (policy, critic):
        if model is not None and gradient_checkpointing:
            # Takes effect in train mode only; the loop switches to train mode around the
            # update and back to eval mode for generation (which needs the KV cache).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy, reference, critic


def critic_config(model_path: str):
    """The model's config with a one-label head and every dropout probability at 0."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, num_labels=1)
    for key, value in config.to_dict().items():
        if "dropout" in key and isinstance(value, (int, float)):
            setattr(config, key, 0.0)
    config.classifier_dropout = 0.0  # the head's, which the config need not name
    return config


def engine_length(tokenizer, prompt_ids: list, settings: dict, vs: validate.ValidationSet | None) -> int:
    """The engine's context: the longest training prompt plus the response length, or the
    longest validation prompt plus its response length where that is longer."""
    length = max(map(len, prompt_ids)) + settings["max_new_tokens"]
    if vs is not None and len(vs.prompts):
        ids = tokenizer(list(vs.prompts["prompt"]), add_special_tokens=False)["input_ids"]
        length = max(length, max(map(len, ids)) + vs.sampling.max_new_tokens)
    return length


def setup(settings: dict, model_path: str, prompts_path: str, vstar_path, out_dir: Path, generation: dict,
          gradient_checkpointing: bool, validation_path: str | None = None, distributed: str = "ddp") -> Trainer:
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    # Data parallel (`accelerate launch --num_processes N`): each process samples and trains
    # on its 1/N of every batch with its own generation engine on its own device; under FSDP
    # the networks are sharded over the processes and the engines get the gathered weights.
    world = int(os.environ.get("WORLD_SIZE", 1))  # set by the launcher (before any process group)
    check_distributed(settings, distributed, world)
    claim_local_device()
    fsdp = distributed == "fsdp" and world > 1
    n_minis, accum = batch_layout(settings, world)
    accelerator = make_accelerator(settings, accum)
    set_seed(settings["seed"], device_specific=True)  # seed + process index
    verify_if_stage(model_path)  # the demo's model is a stage output
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data, prompt_ids = load_prompts(settings, prompts_path, vstar_path, tokenizer)
    settings = with_epochs(settings, len(data))
    vs = (validate.load(settings, validation_path, accelerator.process_index, world, data)
          if validation_path else None)
    method = methods.get(settings["method"])
    policy, reference, critic = load_models(settings, model_path, accelerator, gradient_checkpointing, fsdp)
    policy, optimizer, scheduler = optimize(accelerator, policy, settings, settings["lr"], fsdp)
    critic_opt = critic_sched = None
    if critic is not None:
        critic, critic_opt, critic_sched = optimize(accelerator, critic, settings, method.critic_lr(settings), fsdp)
        critic.eval()
    # Colocated engine: vLLM lives in this process and gets the new weights after every step.
    generator = make_generator(
        settings["backend"], tokenizer, model=accelerator.unwrap_model(policy), model_path=model_path,
        batch_size=generation["batch_size"], seed=settings["seed"],
        max_model_len=engine_length(tokenizer, prompt_ids, settings, vs),
        vllm=VLLMSettings.from_runtime(generation), dtype=settings["compute_dtype"],
    )
    sampling = SamplingSettings(n=method.samples(settings), temperature=settings["temperature"],
                                top_p=settings["top_p"], max_new_tokens=settings["max_new_tokens"])
    return Trainer(settings, method, method.bind(settings), accelerator, world, n_minis, accum, tokenizer, policy,
                   reference, optimizer, scheduler, critic, critic_opt, critic_sched, generator, data, prompt_ids,
                   sampling, out_dir / "checkpoints", gradient_checkpointing, vs, fsdp)


# --------------------------------------------------------------------------- one step


@dataclass
class Rollout:
    """One generation batch of this process, flattened prompt-major (n responses per prompt)."""

    idx: list[int]  # this process's prompts (rows of the data)
    p_ids: list[list[int]]  # prompt tokens, one per response
    r_ids: list[list[int]]  # response tokens
    rewards: torch.Tensor  # [B]
    vstars: torch.Tensor  # [B]
    finished: list[bool]  # ended with EOS
    engine_logp: torch.Tensor | None = None  # [B, T] the engine's log-probs of the sampled tokens (NaN: none)
    draws: int = 1  # generation rounds (several under dynamic sampling)
    dropped: int = 0  # groups dropped by dynamic sampling (all rewards equal)
    # filled in by `score`
    ref_logp: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    prepared: dict = field(default_factory=dict)  # the method's own [B, T] inputs (Method.prepare)


def roll_out(trainer: Trainer, grader: Grader, step: int, times: dict) -> Rollout:
    """Sample this process's share of the step's prompts and grade the responses. The sampler
    is seeded per step and process, so a resumed run draws what the uninterrupted run drew.
    Under dynamic sampling (`dynamic_sampling`) groups with all-equal rewards are dropped and
    further prompts drawn until the share is full."""
    settings, n, acc = trainer.settings, trainer.sampling.n, trainer.accelerator
    batch = batch_indices(step, settings["batch_size"], len(trainer.data), settings["seed"])
    idx = batch[acc.process_index :: trainer.world]
    seed = settings["seed"] * 1_000_003 + step + 7_919 * acc.process_index
    times["generate"] = times["grade"] = 0.0
    groups = sample_groups(trainer, grader, idx, seed, times)
    block = settings.get(trainer.method.name, {}) if trainer.method.group_filter else {}
    draws, dropped, taken = 1, 0, set(batch)  # every process's prompts: each draw is split alike
    if block.get("dynamic_sampling"):
        want, groups = len(idx), [g for g in groups if informative(g)]
        dropped = len(idx) - len(groups)
        while len(groups) < want:
            if draws >= block["max_draws"]:
                raise RuntimeError(
                    f"train.{trainer.method.name}.dynamic_sampling: {len(groups)} of {want} groups with unequal "
                    f"rewards after {draws} draws at step {step + 1} (train.{trainer.method.name}.max_draws); "
                    "the prompts are too easy or too hard for the policy, or the group too small")
            drawn = extra_prompts(step, draws, settings, len(trainer.data), taken)
            taken.update(drawn)
            more = drawn[acc.process_index :: trainer.world]
            fresh = sample_groups(trainer, grader, more, seed + 104_729 * draws, times)
            kept = [g for g in fresh if informative(g)]
            dropped += len(fresh) - len(kept)
            groups += kept
            draws += 1
        groups = groups[:want]
    tick = clock(trainer.accelerator.device)
    trainer.generator.sleep()  # GPU: hand the engine's memory to the update
    times["generate"] += clock(trainer.accelerator.device) - tick
    completions = [c for g in groups for c in g["completions"]]
    finished = [c.finished for c in completions]
    return Rollout(
        idx=[g["prompt"] for g in groups],
        p_ids=[trainer.prompt_ids[g["prompt"]] for g in groups for _ in range(n)],
        r_ids=[c.token_ids or [trainer.tokenizer.eos_token_id] for c in completions],
        rewards=torch.cat([g["rewards"] for g in groups]),
        vstars=torch.tensor(trainer.data["vstar"].iloc[[g["prompt"] for g in groups]].repeat(n).to_numpy(),
                            dtype=torch.float32, device=acc.device),
        finished=finished,
        engine_logp=engine_logprobs(completions, acc.device),
        draws=draws,
        dropped=dropped,
    )


def sample_groups(trainer: Trainer, grader: Grader, idx: list[int], seed: int, times: dict) -> list[dict]:
    """Sample n responses to each prompt of `idx` with their log-probs and grade them: one
    dict per prompt (its row, completions, rewards [n]); adds to the phase times."""
    settings, n, acc = trainer.settings, trainer.sampling.n, trainer.accelerator
    tick = clock(trainer.accelerator.device)
    batch = trainer.data.iloc[idx]
    outs = trainer.generator.generate(list(batch["prompt"]), trainer.sampling, progress=False, seed=seed, logprobs=True)
    times["generate"] += clock(trainer.accelerator.device) - tick
    tick = clock(trainer.accelerator.device)
    completions = [c for cs in outs for c in cs]
    grades = grader.grade(list(batch["answer"].repeat(n)), [c.text for c in completions])
    times["grade"] += clock(trainer.accelerator.device) - tick
    rewards = torch.tensor(grades.rewards, device=acc.device)
    if settings["require_eos"]:  # the authors' reward: 0 for a response cut at the length limit
        rewards = rewards * torch.tensor([c.finished for c in completions], dtype=rewards.dtype, device=acc.device)
    return [{"prompt": i, "completions": outs[k], "rewards": rewards[k * n : (k + 1) * n]} for k, i in enumerate(idx)]


def informative(group: dict) -> bool:
    """Whether a group's rewards differ (DAPO's filter: an all-equal group has no advantage)."""
    return bool((group["rewards"] != group["rewards"][0]).any())


def extra_prompts(step: int, draw: int, settings: dict, n_prompts: int, taken: set) -> list[int]:
    """The prompts of dynamic sampling's extra draw `draw` of a step: `batch_size` prompts not
    yet drawn in this step, from a permutation seeded by the run's seed, the step and the draw."""
    g = torch.Generator().manual_seed(settings["seed"] * 100_003 + 7_919 * step + 104_729 * draw + 1)
    return [i for i in torch.randperm(n_prompts, generator=g).tolist() if i not in taken][: settings["batch_size"]]


def engine_logprobs(completions: list, device) -> torch.Tensor | None:
    """The engine's log-probs of the sampled tokens as a right-padded [B, T] tensor aligned
    with `score`'s (NaN where the engine gave none: an empty response scored as one EOS token)."""
    if any(c.logprobs is None for c in completions):
        return None
    width = max(max(len(c.token_ids) for c in completions), 1)
    out = torch.full((len(completions), width), float("nan"))
    for b, c in enumerate(completions):
        out[b, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
    return out.to(device)


def micro_slices(trainer: Trainer) -> list[list[slice]]:
    """Response rows of each micro-batch, grouped by mini-batch; micro-batches hold whole
    prompts (GRPO's groups, REBEL's pairs)."""
    rows = trainer.settings["micro_batch_size"] * trainer.sampling.n
    return [[slice((m * trainer.accum + k) * rows, (m * trainer.accum + k + 1) * rows) for k in range(trainer.accum)]
            for m in range(trainer.n_minis)]


def score(trainer: Trainer, rollout: Rollout, times: dict) -> None:
    """Everything the update needs from before it: reference log-probs (where the method reads
    them or the KL is measured, `train.measure_kl`); pi_old's log-probs
    when a method needs them and the batch has several mini-batches (with one, pi_old is the
    policy itself and the update reads them off its own forward pass) or it reads them first;
    the critic's values; what the method computes over the whole batch (`Method.prepare`)."""
    settings, pad = trainer.settings, trainer.tokenizer.pad_token_id
    parts = [rows for mini in micro_slices(trainer) for rows in mini]
    temp = settings["temperature"]

    def logprobs(model, p, resp, pad_id):
        return token_logprobs(model, p, resp, pad_id, temp)

    tick = clock(trainer.accelerator.device)
    with trainer.accelerator.autocast():
        # runs planned before train.measure_kl existed measured the KL
        if trainer.method.reads_reference(settings) or settings.get("measure_kl", True):
            rollout.ref_logp, rollout.mask = score_batch(logprobs, trainer.reference, rollout.p_ids, rollout.r_ids,
                                                         parts, pad)
        else:
            rollout.mask = response_mask(rollout.r_ids, trainer.accelerator.device)
        times["ref_logprobs"] = clock(trainer.accelerator.device) - tick
        tick = clock(trainer.accelerator.device)
        if trainer.method.needs_old_logp and (trainer.n_minis > 1 or trainer.method.old_logp_first(settings)):
            rollout.old_logp, _ = score_batch(logprobs, trainer.policy, rollout.p_ids, rollout.r_ids, parts, pad)
        times["old_logprobs"] = clock(trainer.accelerator.device) - tick
        tick = clock(trainer.accelerator.device)
        if trainer.critic is not None:
            rollout.old_values, _ = score_batch(token_values, trainer.critic, rollout.p_ids, rollout.r_ids, parts, pad)
        if trainer.method.prepare is not None:
            rollout.prepared = trainer.method.prepare(rollout, settings, lambda x: trainer.accelerator.reduce(x, "sum"))
        times["values"] = clock(trainer.accelerator.device) - tick


def mini_batch_tokens(trainer: Trainer, rollout: Rollout) -> list[float]:
    """token_mean denominators: each mini-batch's response tokens over all processes, divided
    by the micro-batch losses averaged into its gradient (accumulation x processes)."""
    counts = torch.tensor([float(sum(rollout.mask[rows].sum() for rows in mini)) for mini in micro_slices(trainer)],
                          device=trainer.accelerator.device)
    if trainer.world > 1:
        counts = trainer.accelerator.reduce(counts, "sum")
    return (counts / (trainer.accum * trainer.world)).tolist()


GAP_KEYS = ("gap_sum", "gap_tokens", "gap_max")  # per micro-batch, combined by `gap_stats`


def micro_loss(trainer: Trainer, rollout: Rollout, rows: slice, tokens: float, step: int, before_update: bool = True):
    """The loss of one micro-batch (with grad) and its detached statistics; with the engine's
    log-probs and `before_update` (no optimizer step yet in this batch, or pi_old scored
    before the update), their gap to the trainer's (`GAP_KEYS`)."""
    settings, pad = trainer.settings, trainer.tokenizer.pad_token_id
    with_entropy = settings["entropy_coef"] > 0
    logp, entropy, _ = token_logprobs_and_entropy(trainer.policy, rollout.p_ids[rows], rollout.r_ids[rows], pad,
                                                  settings["temperature"], entropy=with_entropy)
    width = logp.shape[1]  # this micro-batch's longest response

    def cut(x):
        return None if x is None else x[rows, :width]

    mask = rollout.mask[rows, :width]
    old_logp = cut(rollout.old_logp) if rollout.old_logp is not None else logp.detach()
    batch = MicroBatch(logp=logp, old_logp=old_logp, ref_logp=cut(rollout.ref_logp), mask=mask,
                       rewards=rollout.rewards[rows], vstar=rollout.vstars[rows], tokens=tokens,
                       loss_agg=settings["loss_agg"], old_values=cut(rollout.old_values),
                       engine_logp=cut(rollout.engine_logp), max_len=settings["max_new_tokens"],
                       **{k: cut(v) for k, v in rollout.prepared.items()})
    if trainer.critic is not None:
        batch.values, _ = token_values(trainer.critic, rollout.p_ids[rows], rollout.r_ids[rows], pad)
    loss, stats = trainer.loss_fn(batch)
    if with_entropy:  # the authors' bonus: loss - entropy_coef * entropy (dp_actor_apo.py, line 257)
        ent = aggregate(entropy, mask, settings["loss_agg"], tokens)
        loss = loss - settings["entropy_coef"] * ent
        stats["entropy"] = ent.item()
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"non-finite loss {loss.item()} at optimizer step {step + 1}; the last good checkpoint "
            f"is {latest_checkpoint(trainer.ckpt_root)}"
        )
    if rollout.engine_logp is not None and (before_update or rollout.old_logp is not None):
        stats.update(zip(GAP_KEYS, logprob_gap(batch.engine_logp, old_logp, mask)))
    if batch.ref_logp is not None:  # sample-based KL(pi || pi_ref) = E_pi[sum_t log pi - log pi_ref]
        stats["kl"] = ((logp.detach() - batch.ref_logp) * mask).sum(-1).mean().item()
    stats["loss"] = loss.item()
    return loss, stats


def update(trainer: Trainer, rollout: Rollout, step: int) -> dict:
    """One optimizer step per mini-batch, gradients accumulated over its micro-batches; the LR
    schedule steps once per generation step. Returns the mean of every micro-batch statistic
    and of the mini-batches' gradient norms."""
    acc, stats, norms = trainer.accelerator, [], []
    for model in trainer.trained:
        model.train(trainer.gradient_checkpointing)  # unchanged (eval) without checkpointing
    # A sharded model is not wrapped by accelerate, whose wrapper casts the forward: the same
    # autocast as in `score`, so that pi_old and the policy are computed alike.
    forward_context = acc.autocast if trainer.fsdp else contextlib.nullcontext
    for m, (mini, tokens) in enumerate(zip(micro_slices(trainer), mini_batch_tokens(trainer, rollout))):
        for rows in mini:
            with acc.accumulate(*trainer.trained):
                with forward_context():
                    loss, micro_stats = micro_loss(trainer, rollout, rows, tokens, step, before_update=m == 0)
                acc.backward(loss)
                if acc.sync_gradients:  # the mini-batch's last micro-batch
                    norm = acc.clip_grad_norm_(trainer.policy.parameters(), trainer.settings["max_grad_norm"])
                    norms.append(grad_norm(norm))
                    if trainer.critic is not None:
                        acc.clip_grad_norm_(trainer.critic.parameters(), trainer.settings["max_grad_norm"])
                    for opt in (trainer.optimizer, trainer.critic_optimizer):
                        if opt is not None:
                            opt.step()
                            opt.zero_grad(set_to_none=True)
            stats.append(micro_stats)
    for sched in (trainer.scheduler, trainer.critic_scheduler):
        if sched is not None:
            sched.step()
    for model in trainer.trained:
        model.eval()
    gap = gap_stats(stats)
    means = {k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}
    return {**means, **gap, "grad_norm": sum(norms) / len(norms), "optimizer_steps": len(norms)}


def gap_stats(stats: list[dict]) -> dict:
    """The train-inference gap of the step from the micro-batches that measured it (their
    `GAP_KEYS`, taken out of `stats`): the mean and max of |log pi_engine - log pi_trainer|
    over the response tokens."""
    parts = [tuple(x.pop(k) for k in GAP_KEYS) for x in stats if GAP_KEYS[0] in x]
    count = sum(p[1] for p in parts)
    if not count:
        return {}
    return {"logprob_gap_mean": sum(p[0] for p in parts) / count, "logprob_gap_max": max(p[2] for p in parts)}


def grad_norm(norm) -> float:
    """The clipped gradients' total norm as a number (DeepSpeed may return None; FSDP a
    replicated DTensor)."""
    if norm is None:
        return float("nan")
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def step_row(trainer: Trainer, rollout: Rollout, step: int, update_stats: dict, times: dict) -> dict:
    """The step's metrics (the whole batch's means when several processes train)."""
    lengths = [len(ids) for ids in rollout.r_ids]
    row = {
        "step": step + 1,
        "reward": float(rollout.rewards.mean()),
        "response_length": sum(lengths) / len(lengths),
        "truncated": sum(not f for f in rollout.finished) / len(rollout.finished),
        "vstar": float(rollout.vstars.mean()),
        "lr": trainer.scheduler.get_last_lr()[0],
        **update_stats,  # loss, kl, grad_norm, optimizer_steps and the loss's own statistics
        "tokens": sum(len(trainer.prompt_ids[i]) for i in rollout.idx) * trainer.sampling.n + sum(lengths),
        **{f"time_{k}_s": v for k, v in times.items()},
        "peak_memory_mb": peak_memory_mb(trainer.accelerator.device),
    }
    if trainer.method.group_filter and trainer.settings.get(trainer.method.name, {}).get("dynamic_sampling"):
        row.update(sampling_draws=rollout.draws, groups_dropped=rollout.dropped)
    if trainer.world > 1:  # every process has an equal share
        keys = [k for k in row if k != "step"]
        values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=trainer.accelerator.device)
        row.update(zip(keys, trainer.accelerator.reduce(values, "mean").tolist()))
        row["tokens"] = round(row["tokens"] * trainer.world)
        for key in ("logprob_gap_max",) if "logprob_gap_max" in row else ():  # the largest of all processes
            peak = torch.tensor([row[key]], dtype=torch.float64, device=trainer.accelerator.device)
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            row[key] = float(peak)
    return row


def train_step(trainer: Trainer, grader: Grader, step: int) -> dict:
    """Rollout, score, update, weight sync: one generation step, timed by phase. Time spent
    here is training time; the phases add up to `time_step_s`."""
    times = {}
    t0 = clock(trainer.accelerator.device)
    rollout = roll_out(trainer, grader, step, times)
    score(trainer, rollout, times)
    tick = clock(trainer.accelerator.device)
    stats = update(trainer, rollout, step)
    times["update"] = clock(trainer.accelerator.device) - tick
    tick = clock(trainer.accelerator.device)
    trainer.generator.sync_weights(trainer.accelerator.unwrap_model(trainer.policy))
    times["sync"] = clock(trainer.accelerator.device) - tick
    times["step"] = clock(trainer.accelerator.device) - t0
    return step_row(trainer, rollout, step, stats, times)


def after_step(trainer: Trainer, row: dict, history: list, monitor: CollapseMonitor, tracker) -> None:
    """Log the step, watch for a collapse."""
    step = row["step"]
    history.append(row)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
    collapse = monitor.update(row["reward"], row["response_length"])
    if collapse:
        log.warning("COLLAPSE: %s", collapse)
        if tracker is not None:
            tracker.set_tags({"collapse": collapse})
        if trainer.settings["stop_on_collapse"]:
            raise RuntimeError(f"training stopped: {collapse} (train.stop_on_collapse is true)")


def validate_if_due(trainer: Trainer, grader: Grader, history: list, validations: list, tracker) -> None:
    """Score the policy on the validation set when the step count calls for it; the training
    time it records is the sum of the steps' `time_step_s` (validation excluded)."""
    step = len(history)
    if trainer.validation is None or not validate.due(step, trainer.settings["steps"], trainer.validation.every,
                                                      validations):
        return
    row = validate.run(trainer, grader, trainer.validation, step, sum(h["time_step_s"] for h in history))
    validations.append(row)
    log.info("validation at step %d: accuracy %.4f (%.1f s)", step, row["accuracy"], row["time_validate_s"])
    if tracker is not None:
        tracker.log_metrics({"val_accuracy": row["accuracy"], "val_train_time_s": row["train_time_s"],
                             "val_response_length": row["response_length"],
                             "time_validate_s": row["time_validate_s"]}, step=step)


def checkpoint_if_due(trainer: Trainer, history: list, validations: list, monitor: CollapseMonitor,
                      force: bool = False) -> None:
    """A checkpoint holds the metric and validation histories, so a resumed run's outputs
    are those of the uninterrupted run."""
    step = len(history)
    if force or step % trainer.settings["checkpoint_every"] == 0 or step == trainer.settings["steps"]:
        state = {"step": step, "history": history, "validation": validations, "collapse": monitor.message}
        save_checkpoint(trainer.accelerator, trainer.ckpt_root, step, state, trainer.settings["keep_checkpoints"],
                        trainer.parts, trainer.sharded)


def stop_if_out_of_time(trainer: Trainer, deadline: float | None, history: list, validations: list,
                        monitor: CollapseMonitor) -> None:
    """Before the scheduler's limit: checkpoint now and stop, so that the next job (Snakemake's
    retry) resumes here instead of redoing what a killed job would lose. Every process stops
    at the same step (the main process's clock decides)."""
    if deadline is None or len(history) == trainer.settings["steps"]:
        return
    late = out_of_time(deadline, [h["time_step_s"] for h in history], time.time())
    flag = torch.tensor([float(late and trainer.accelerator.is_main_process)], device=trainer.accelerator.device)
    if trainer.accelerator.reduce(flag, "sum").item() == 0:
        return
    if len(history) % trainer.settings["checkpoint_every"]:  # not just written by checkpoint_if_due
        checkpoint_if_due(trainer, history, validations, monitor, force=True)
    raise TimeLimitReached(
        f"stopped after step {len(history)} of {trainer.settings['steps']} to end before the job's time limit "
        "(resources.train.runtime); the next attempt resumes from this step's checkpoint "
        "(resources.train.pieces: how many jobs a run may take)")


def train(
    settings: dict,
    model_path: str,
    prompts_path: str,
    vstar_path: str | None,
    out_dir: str | os.PathLike,
    generation: dict,
    grading: dict,
    tracker=None,
    gradient_checkpointing: bool = False,
    validation_path: str | None = None,
    distributed: str = "ddp",
    time_limit_min: float | None = None,
) -> dict:
    """Stage 2 from start (or from the last checkpoint) to `settings["steps"]`; writes
    `out_dir/model` and returns the metric history, the validations (with a validation set at
    `validation_path`) and a summary. Under a scheduler it stops before the job's time limit
    (`time_limit_min`) with a checkpoint, raising TimeLimitReached."""
    out_dir = Path(out_dir)
    deadline = job_deadline(time_limit_min)
    trainer = setup(settings, model_path, prompts_path, vstar_path, out_dir, generation, gradient_checkpointing,
              validation_path, distributed)
    monitor = CollapseMonitor(**settings["collapse"])
    history, validations = [], []
    state = resume(trainer.accelerator, trainer.ckpt_root, trainer.parts, trainer.sharded)
    if state is not None:
        history, validations = state["history"], state.get("validation", [])
        for h in history:
            monitor.update(h["reward"], h["response_length"])
        trainer.generator.sync_weights(trainer.accelerator.unwrap_model(trainer.policy))  # the engine loaded step 0's
    start = len(history)
    steps = trainer.settings["steps"]  # train.epochs resolved against the prompts (`with_epochs`)
    bar = tqdm(range(start, steps), desc="train", initial=start, total=steps,
               mininterval=2, disable=not trainer.accelerator.is_main_process)
    # time bound and method from the stage's address; the worker count is a runtime knob
    with Grader.from_settings(settings, grading["workers"]) as grader:
        validate_if_due(trainer, grader, history, validations, tracker)  # step 0
        for step in bar:
            row = train_step(trainer, grader, step)
            after_step(trainer, row, history, monitor, tracker)
            validate_if_due(trainer, grader, history, validations, tracker)
            checkpoint_if_due(trainer, history, validations, monitor)
            stop_if_out_of_time(trainer, deadline, history, validations, monitor)
            bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{row.get('kl', math.nan):.2f}",
                            len=f"{row['response_length']:.1f}")
    save_model(trainer, out_dir)
    return {"history": _metrics_frame(history), "validation": validate.frame(validations),
            "summary": summarize(trainer, history, monitor, validations)}


def save_model(trainer: Trainer, out_dir: Path) -> None:
    """The trained policy in the compute dtype (what the evaluation engines run), atomically."""
    final = trainer.accelerator.unwrap_model(trainer.policy)
    dtype = getattr(torch, trainer.settings["compute_dtype"])
    if trainer.fsdp:  # gathered on every process (collectives), kept by the main one
        final = unsharded_copy(final, dtype, keep=trainer.accelerator.is_main_process)
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        with atomic_path(out_dir / output_name("train", "model"), is_dir=True) as tmp:
            final.to(dtype).save_pretrained(tmp)
            trainer.tokenizer.save_pretrained(tmp)


def unsharded_copy(model, dtype: torch.dtype, keep: bool):
    """A plain copy of a sharded model in `dtype` on the CPU, built from its gathered tensors
    one at a time; None where not `keep` (the gathers still run there: each is a collective)."""
    from transformers import AutoModelForCausalLM

    weights = {}
    for name, tensor in sharding.full_weights(model, dtype):
        if keep:
            weights[name] = tensor.cpu()
    if not keep:
        return None
    with torch.device("meta"):  # no allocation: every saved tensor is assigned below
        copy = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = copy.load_state_dict(weights, strict=False, assign=True)
    copy.tie_weights()
    if unexpected or any(p.is_meta for p in copy.parameters()):
        raise RuntimeError(f"gathered weights do not fill the model: missing {missing}, unexpected {unexpected}")
    return copy


def _metrics_frame(history: list) -> pd.DataFrame:
    metrics = pd.DataFrame(history)
    # one column order whether rows came from this process or from a checkpoint's JSON
    return metrics[["step", *sorted(c for c in metrics.columns if c != "step")]]


def summarize(trainer: Trainer, history: list, monitor: CollapseMonitor, validations: list) -> dict:
    metrics = _metrics_frame(history)
    first = metrics.head(min(len(metrics), monitor.window))
    last_window = metrics.tail(min(len(metrics), monitor.window))
    return {
        "steps": int(trainer.settings["steps"]),
        "optimizer_steps": int(metrics["optimizer_steps"].sum()),
        "reward_first": float(first["reward"].mean()),
        "reward_last": float(last_window["reward"].mean()),
        "kl_last": float(last_window["kl"].mean()) if "kl" in metrics else None,  # None: not measured
        "response_length_last": float(last_window["response_length"].mean()),
        "collapse": monitor.message or "",
        "train_time_s": float(metrics["time_step_s"].sum()),
        "tokens": int(metrics["tokens"].sum()),
        "peak_memory_mb": float(metrics["peak_memory_mb"].max()),
        # engine vs trainer log-probs of the sampled tokens, over all steps (None: not measured)
        "logprob_gap_mean": float(metrics["logprob_gap_mean"].mean()) if "logprob_gap_mean" in metrics else None,
        "logprob_gap_max": float(metrics["logprob_gap_max"].max()) if "logprob_gap_max" in metrics else None,
        "compute_dtype": trainer.settings["compute_dtype"],
        "gradient_checkpointing": bool(trainer.gradient_checkpointing),
        # validation: accuracy after the last step and the time it cost (not in train_time_s)
        "val_accuracy_final": validations[-1]["accuracy"] if validations else None,
        "val_accuracy_best": max(v["accuracy"] for v in validations) if validations else None,
        "validate_time_s": sum(v["time_validate_s"] for v in validations),
    }


def run(settings: dict, model_path: str, prompts_path: str, vstar_path: str | None, out_dir: str | os.PathLike,
        runtime: dict, validation_path: str | None = None, tracker=None) -> dict:
    """Stage entry: `train`, then (in the process given the tracker: the main one) its
    outputs written next to the model: metrics.parquet, validation.parquet, summary.json."""
    from apo.io import write_json, write_parquet

    knobs = runtime.get("train", {})
    result = train(settings, model_path, prompts_path, vstar_path, out_dir, runtime["generation"], runtime["grading"],
                   tracker=tracker, validation_path=validation_path,
                   gradient_checkpointing=knobs.get("gradient_checkpointing", False),
                   distributed=knobs.get("distributed", "ddp"), time_limit_min=knobs.get("time_limit_min"))
    if tracker is not None:
        out_dir = Path(out_dir)
        tracker.log_metrics({f"final.{k}": v for k, v in result["summary"].items() if isinstance(v, (int, float))})
        write_json(out_dir / output_name("train", "summary"), result["summary"])
        write_parquet(out_dir / output_name("train", "validation"), result["validation"])
        write_parquet(out_dir / output_name("train", "metrics"), result["history"])
    return result
