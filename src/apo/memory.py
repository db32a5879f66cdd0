"""Per-GPU memory plan of each training job, made before anything is queued.

The workflow prints it on every run (dry runs included) and stops when a job cannot fit
`resources.train.gpu_memory_gb`; `apo plan CONFIG` prints the same table. Nothing is loaded
or downloaded: sizes come from the model's shape (`model_shape`) and the config, by the
arithmetic below. All sizes are bytes; the table prints GiB (2**30 bytes).

Precision (the paper's recipe, as verl's FSDP trainer runs it): the trained networks keep
fp32 master weights, fp32 gradients and two fp32 AdamW moments (4 + 4 + 8 bytes a parameter);
the forward and backward run in the compute dtype `train.compute_dtype` (bf16: autocast); the
frozen reference is held in `train.reference_dtype`, whole on every GPU except under fsdp,
which shards it like the policy (apo.sharding; its passes come before the update and gather one
layer at a time, not counted). PPO's critic is the same network with a scalar head instead of
the LM head, trained with its own AdamW.

Sharding over the job's N = `resources.train.gpu` processes (`resources.train.distributed`):
- one process: everything whole.
- ddp: everything whole on every GPU, and the gradients twice: DDP's reducer keeps its own
  flat gradient buckets next to `param.grad` (accelerate's default, gradient_as_bucket_view
  off), and those buckets stay allocated between steps.
- deepspeed (ZeRO-2, workflow/accelerate/deepspeed.yaml): weights whole; gradients and
  optimizer state sharded, the optimizer state being an fp32 copy of the shard plus the two
  moments (12 bytes a parameter / N; ZeRO clones the shard even when the weights are fp32).
- fsdp (FSDP2 full shard, apo.sharding): weights, gradients, optimizer state and the
  reference sharded / N. In flight: the root unit (final norm, a tied embedding, the
  critic's scalar head: never resharded during a micro-batch), the LM head or the embedding
  (each a unit of its own when untied, gathered only around its own use) and two decoder
  layers (the one computing and the one prefetched), gathered in the compute dtype, with their unsharded gradients (compute
  dtype, plus an fp32 copy for the reduce-scatter): 2c + 4 bytes a parameter in flight.
  FSDP's mixed-precision policy does the casting (param_dtype = compute dtype), as the
  trainer sets it; autocast over fp32 unsharded weights would instead keep a bf16 copy of
  every weight in autocast's cache (the full 2 bytes a parameter on every GPU). The weight
  sync after each step gathers one tensor at a time in bf16 while the engine is awake: the
  largest (the embedding) and its shard, counted in the generation phase.
Without FSDP, bf16 compute holds a bf16 copy of every weight that goes through a linear layer
(autocast's cache, and the copies the linear layers save for backward): the decoder layers
and the LM head, c bytes a parameter, the "compute" column. The embedding lookup stays fp32.

Generation engine, one per training process: vLLM takes `generation.vllm.gpu_memory_utilization`
of the GPU for its weights and KV cache while it generates; in the update, with sleep mode
(`generation.vllm.sleep`), it keeps only ENGINE_ASLEEP_GIB (CUDA graphs, workspace), and
without sleep mode its whole share. The backend is the one the config resolves to (auto:
vLLM where it is installed, as in the GPU environment, envs/gpu.txt). The transformers
engine generates with the policy itself: its KV cache for `generation.batch_size` sequences
(the trainer refuses it under fsdp, where the policy is sharded; the plan says so).

Activations of one micro-batch (micro_batch_size prompts x samples per prompt sequences of
L = prompt.max_prompt_tokens + train.max_new_tokens tokens, SDPA / flash attention, so no
L x L scores), bytes a token of one decoder layer, h hidden, i intermediate, kv the key/value
width, c the compute dtype's size. The residual stream stays fp32 (fp32 master weights):
- attention: RMSNorm keeps its fp32 input and normalised output (8h); the q/k/v projections
  each keep their cast input (3ch under autocast, ch in fp32, where one tensor is shared);
  attention keeps q, k, v after RoPE (c(h + 2kv)) and its output (ch, the o_proj input).
- MLP: RMSNorm 8h; gate/up inputs (2ch under autocast, else ch); gate output (SiLU input),
  SiLU output, up output and their product (the down_proj input): 4ci.
The final norm keeps 8h + ch a token. Gradient checkpointing keeps each layer's fp32 input
(4h a token a layer) and one layer's activations while it is recomputed.
Logits: [sequences, L, vocabulary] elements, the usual peak for a 150k vocabulary, an upper
bound: the trainer computes them from the shortest prompt's last token on (apo.scoring). It
(train.token_logprobs) casts them to fp32, gathers the targets and takes logsumexp: the fp32
copy is kept for backward, and the backward of logsumexp and gather adds up to three fp32
buffers of that shape: LOGIT_BYTES = 16 bytes an element at the peak (about 8 in the forward
pass); tests/test_memory.py measures it on CPU (the process's resident high-water mark), and
the per-layer bytes against what autograd keeps. PPO's critic runs in the same micro-batch
and backward as the policy, so its layer activations (no logits) add to the policy's. Under
fsdp its units in flight do not: the critic's forward follows the policy's, and autograd runs
the later-recorded nodes first, so the critic's backward is done before the policy's starts;
only the two root units are gathered throughout (modelled, not measured).

Also counted: OTHER_GIB a process (CUDA context, NCCL buffers). Not counted: allocator
fragmentation, the rollout tensors of a batch (token ids, per-token log-probs: megabytes),
the reference and old-log-prob passes (no gradient: smaller than the update).

Parameter counts are exact for Qwen2 / Llama-style decoders; tests/test_memory.py checks
them against transformers' own model (built on the meta device) and the states against
accelerate's `estimate_training_usage`. DeepSpeed's `estimate_zero*_model_states_mem_needs`
helpers assume fp16 mixed precision (2-byte weights and gradients) and are not used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from apo import methods, sweep

GIB = 2**30
LOGIT_BYTES = 16
ENGINE_ASLEEP_GIB = 2.0
OTHER_GIB = 1.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MODEL_PARAMS_KEY = "resources.train.model_params"
GPU_MEMORY_KEY = "resources.train.gpu_memory_gb"


class MemoryPlanError(ValueError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes, named as in its config.json."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    head_dim: int | None = None
    attention_bias: bool = True  # Qwen2 has q/k/v biases; Llama-style configs say otherwise
    source: str = ""

    @property
    def dims(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.dims

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.dims

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden_size, self.q_width, self.kv_width
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h  # MLP, two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def root_params(self) -> int:
        """Outside the decoder layers: embeddings, LM head (when untied), final norm."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + head + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_hidden_layers * self.layer_params + self.root_params

    @property
    def critic_params(self) -> int:
        """The same network with a scalar head (weight and bias) instead of the LM head."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.params - head + self.hidden_size + 1

    @classmethod
    def from_config(cls, cfg: dict, source: str) -> "ModelShape":
        """From a config.json's fields; raises MemoryPlanError naming a missing one."""
        cfg = cfg.get("text_config", cfg)
        need = [
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        ]
        missing = [k for k in need if k not in cfg]
        if missing:
            raise MemoryPlanError(f"{source}: no {', '.join(missing)}; the memory plan needs them")
        bias = cfg.get("attention_bias", cfg.get("model_type", "qwen2") == "qwen2")
        return cls(
            **{k: int(cfg[k]) for k in need},
            num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
            attention_bias=bool(bias),
            source=source,
        )


def _qwen25(hidden, layers, heads, kv_heads, inter, vocab, tied, name) -> ModelShape:
    return ModelShape(
        hidden, layers, heads, kv_heads, inter, vocab, tied, source=f"{name} (built-in table)"
    )


# The paper's models, from the config.json each publishes on the Hugging Face hub (Qwen2
# architecture, q/k/v biases, head_dim 128). Parameters: 1.54e9, 3.09e9 and 7.62e9, the
# counts Qwen's model cards give (1.54B, 3.09B, 7.61B).
KNOWN_MODELS = {
    name: _qwen25(*dims, name)
    for name, dims in {
        "Qwen/Qwen2.5-1.5B": (1536, 28, 12, 2, 8960, 151936, True),
        "Qwen/Qwen2.5-3B": (2048, 36, 16, 2, 11008, 151936, True),
        "Qwen/Qwen2.5-7B": (3584, 28, 28, 4, 18944, 152064, False),
    }.items()
}


def model_shape(config: dict, model_dir: str) -> ModelShape:
    """The policy's shape: `resources.train.model_params`, else the config.json in
    `model_dir` (a local model, or the demo model once built), else the demo's settings,
    else the built-in table of hub models."""
    override = config["resources"]["train"].get("model_params")
    if override:
        return ModelShape.from_config(override, MODEL_PARAMS_KEY)
    path = os.path.join(model_dir, "config.json")
    if os.path.isfile(path):
        with open(path) as fh:
            return ModelShape.from_config(json.load(fh), path)
    if config["model"] == "demo":
        m = config["demo"]["model"]
        h, heads = m["hidden_size"], m["num_heads"]
        return ModelShape(
            h,
            m["num_layers"],
            heads,
            heads,
            m["intermediate_size"],
            m["vocab_size"],
            True,
            head_dim=h // heads,
            source="demo.model (the vocabulary at most this size)",
        )
    if config["model"] in KNOWN_MODELS:
        return KNOWN_MODELS[config["model"]]
    raise MemoryPlanError(model_shape_error(config["model"]))


def model_shape_error(model: str) -> str:
    return (
        f"memory plan: the size of model '{model}' is unknown here (not a local directory "
        f"with a config.json, not one of {', '.join(KNOWN_MODELS)}), and nothing is downloaded at "
        f"plan time. Set {MODEL_PARAMS_KEY} to the fields of its config.json (hidden_size, "
        f"num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, "
        f"tie_word_embeddings), or {GPU_MEMORY_KEY}: null to plan without a memory check."
    )


@dataclass(frozen=True)
class Job:
    """What one training job's memory depends on, read from the validated config."""

    label: str
    method: str
    gpus: int
    distributed: str  # "single" for one process
    batch_size: int  # prompts per optimizer step, which micro-batches must divide
    micro_batch_size: int
    samples: int  # sequences per prompt
    seq_len: int
    compute_bytes: int
    reference_bytes: int
    gradient_checkpointing: bool
    backend: str
    engine_share: float
    engine_sleeps: bool
    generation_batch: int
    gpu_memory_gb: float | None

    @property
    def seqs(self) -> int:
        return self.micro_batch_size * self.samples

    @property
    def shards(self) -> int:
        return self.gpus if self.distributed != "single" else 1


def samples_per_prompt(train: dict, method: str) -> int:
    """Responses per prompt; of a sweep over what sets them (a GRPO-family group size), the
    largest: the peak."""
    m = methods.get(method)
    return max(m.samples(sweep.apply(train, combo)) for combo in sweep.grid(train, set(m.settings)))


def job_from_config(config: dict, label: str, method: str) -> Job:
    t, r, g = config["train"], config["resources"]["train"], config["generation"]
    gpus = max(int(r["gpu"]), 1)
    return Job(
        label=label,
        method=method,
        gpus=gpus,
        distributed=r["distributed"] if gpus > 1 else "single",
        batch_size=t.get("mini_batch_size") or t["batch_size"],
        micro_batch_size=t["micro_batch_size"],
        samples=samples_per_prompt(t, method),
        seq_len=config["prompt"]["max_prompt_tokens"] + t["max_new_tokens"],
        compute_bytes=DTYPE_BYTES[t["compute_dtype"]],
        reference_bytes=DTYPE_BYTES[t["reference_dtype"]],
        gradient_checkpointing=bool(t["gradient_checkpointing"]),
        backend="hf" if g["train_backend"] == "hf" else "vllm",
        engine_share=g["vllm"]["gpu_memory_utilization"],
        engine_sleeps=bool(g["vllm"]["sleep"]),
        generation_batch=g["batch_size"],
        gpu_memory_gb=r.get("gpu_memory_gb"),
    )


@dataclass(frozen=True)
class Estimate:
    """Bytes on one GPU, by part. The peak is the larger of the two phases of a step:
    generation (engine awake, no gradients) and the update (engine asleep, activations)."""

    job: Job
    shape: ModelShape
    weights: float
    grads: float
    grads_kept: float  # of `grads`, what stays allocated while generating (DDP's buckets)
    optimizer: float
    compute: float
    reference: float
    critic: float  # everything of PPO's critic: states and compute copies
    critic_update_only: float  # of `critic`, what exists only in the update
    engine_awake: float
    engine_asleep: float
    engine_generating: float  # beyond the engine while generating (hf under FSDP: gathered weights)
    act_ckpt: float
    act_full: float
    other: float = OTHER_GIB * GIB

    @property
    def activations(self) -> float:
        return self.act_ckpt if self.job.gradient_checkpointing else self.act_full

    def generation_peak(self) -> float:
        return (
            self.weights
            + self.grads_kept
            + self.optimizer
            + self.reference
            + self.critic
            - self.critic_update_only
            + self.engine_awake
            + self.engine_generating
            + self.other
        )

    def update_peak(self, checkpointing: bool | None = None) -> float:
        if checkpointing is None:
            checkpointing = self.job.gradient_checkpointing
        act = self.act_ckpt if checkpointing else self.act_full
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.compute
            + self.reference
            + self.critic
            + self.engine_asleep
            + act
            + self.other
        )

    def peak(self, checkpointing: bool | None = None) -> float:
        return max(self.generation_peak(), self.update_peak(checkpointing))

    @property
    def peak_phase(self) -> str:
        return "generate" if self.generation_peak() > self.update_peak() else "update"


def states(params: int, job: Job) -> tuple[float, float, float, float]:
    """(weights, gradients, of them kept between steps, optimizer state) of one trained
    network on one GPU: fp32 master weights, fp32 gradients, AdamW's two fp32 moments."""
    n = job.shards
    if job.distributed == "fsdp":
        return 4 * params / n, 4 * params / n, 0.0, 8 * params / n
    if job.distributed == "deepspeed":
        return 4 * params, 4 * params / n, 0.0, 12 * params / n
    if job.distributed == "ddp":
        return 4 * params, 8 * params, 4 * params, 8 * params
    return 4 * params, 4 * params, 0.0, 8 * params


def compute_copies(shape: ModelShape, job: Job, critic: bool = False) -> float:
    """Weights in the compute dtype during the update: FSDP's units in flight, else the
    autocast copy of every weight (nothing when computing in fp32 without FSDP)."""
    c = job.compute_bytes
    params = shape.critic_params if critic else shape.params
    if job.distributed == "fsdp":
        outside = params - shape.num_hidden_layers * shape.layer_params  # root, embedding, LM head
        if not critic and not shape.tie_word_embeddings:
            outside -= shape.embedding_params  # the embedding and the LM head are never both in flight
        return (outside + 2 * shape.layer_params) * (2 * c + 4)
    if c == 4:
        return 0.0
    # Autocast casts what goes through a linear layer: the decoder layers and the LM head (the
    # critic's scalar head), not the embedding lookup.
    head = shape.hidden_size + 1 if critic else shape.embedding_params
    return c * (shape.num_hidden_layers * shape.layer_params + head)


def fsdp_overlap(shape: ModelShape, job: Job) -> float:
    """Under fsdp, of PPO's critic's units in flight, what the policy's already count: the two
    layers, and the embedding unit where the policy has one as large (an untied LM head); the
    two networks' non-root units are never gathered at once (module docstring)."""
    if job.distributed != "fsdp":
        return 0.0
    policy_big = 0 if shape.tie_word_embeddings else shape.embedding_params
    return (2 * shape.layer_params + policy_big) * (2 * job.compute_bytes + 4)


def layer_activation_bytes(shape: ModelShape, c: int) -> float:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    h, kv, i = shape.hidden_size, shape.kv_width, shape.intermediate_size
    autocast = c < 4
    attention = (
        8 * h + (3 if autocast else 1) * c * h + c * (shape.q_width + 2 * kv) + c * shape.q_width
    )
    mlp = 8 * h + (2 if autocast else 1) * c * h + 4 * c * i
    return attention + mlp


def activations(shape: ModelShape, job: Job, checkpointing: bool, logits: bool = True) -> float:
    """One micro-batch's activations kept for backward, with the logits' peak."""
    tokens = job.seqs * job.seq_len
    c = job.compute_bytes
    per_layer = layer_activation_bytes(shape, c)
    layers = (
        (shape.num_hidden_layers * 4 * shape.hidden_size + per_layer)
        if checkpointing
        else (shape.num_hidden_layers * per_layer)
    )
    final = 8 * shape.hidden_size + c * shape.hidden_size
    logit_bytes = LOGIT_BYTES * tokens * shape.vocab_size if logits else 0
    return tokens * (layers + final) + logit_bytes


def engine(shape: ModelShape, job: Job) -> tuple[float, float, float]:
    """(awake, asleep, extra while generating) bytes of the generation engine."""
    if job.backend == "hf":
        kv_cache = job.generation_batch * job.seq_len * kv_bytes_per_token(shape, job.compute_bytes)
        gathered = shape.params * job.compute_bytes if job.distributed == "fsdp" else 0.0
        return kv_cache, 0.0, gathered
    # the sync's largest gathered tensor (bf16, the engine's dtype) and its cast shard
    syncing = shape.embedding_params * 2 * (1 + 1 / job.shards) if job.distributed == "fsdp" else 0.0
    if job.gpu_memory_gb is None:
        return 0.0, 0.0, syncing  # a share of an unknown size: shown as a share, not counted
    share = job.engine_share * job.gpu_memory_gb * GIB
    return share, (min(ENGINE_ASLEEP_GIB * GIB, share) if job.engine_sleeps else share), syncing


def kv_bytes_per_token(shape: ModelShape, c: int = 2) -> int:
    return shape.num_hidden_layers * 2 * shape.kv_width * c


def estimate(shape: ModelShape, job: Job) -> Estimate:
    weights, grads, kept, optimizer = states(shape.params, job)
    compute = compute_copies(shape, job)
    ref = shape.params * job.reference_bytes / (job.shards if job.distributed == "fsdp" else 1)
    critic = critic_update_only = 0.0
    critic_act = (0.0, 0.0)
    if methods.get(job.method).critic:
        cw, cg, ckept, co = states(shape.critic_params, job)
        ccompute = compute_copies(shape, job, critic=True) - fsdp_overlap(shape, job)
        critic, critic_update_only = cw + cg + co + ccompute, cg - ckept + ccompute
        critic_act = tuple(activations(shape, job, ckpt, logits=False) for ckpt in (True, False))
    awake, asleep, generating = engine(shape, job)
    return Estimate(
        job=job,
        shape=shape,
        weights=weights,
        grads=grads,
        grads_kept=kept,
        optimizer=optimizer,
        compute=compute,
        reference=ref,
        critic=critic,
        critic_update_only=critic_update_only,
        engine_awake=awake,
        engine_asleep=asleep,
        engine_generating=generating,
        act_ckpt=activations(shape, job, True) + critic_act[0],
        act_full=activations(shape, job, False) + critic_act[1],
    )


def gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def describe(job: Job) -> str:
    if job.distributed == "single":
        return "1 process on 1 GPU"
    return f"{job.gpus} processes, one per GPU, {job.distributed}"


HEAD = (
    "job seqs weights grads optim compute ref critic engine act+ckpt act-ckpt other peak phase "
    "limit fits"
).split()
LEGEND = (
    "  seqs: sequences per micro-batch; compute: weights in the compute dtype (autocast copies, "
    "or FSDP's units in flight); engine: while generating; act+ckpt / act-ckpt: activations and "
    "logits of one micro-batch with / without gradient checkpointing (* = as configured); other: "
    "CUDA context; peak: the larger of the generation and the update phase (src/apo/memory.py)."
)


def engine_note(j: Job) -> str:
    if j.backend == "hf":
        return f"transformers engine: KV cache of {j.generation_batch} sequences"
    asleep = (
        f"{ENGINE_ASLEEP_GIB:g} GiB asleep in the update" if j.engine_sleeps else "awake throughout"
    )
    return f"vLLM engine {j.engine_share:.0%} of the GPU, {asleep}"


def unplanned_engine_note(j: Job) -> str:
    if j.gpu_memory_gb or j.backend == "hf":
        return ""
    return f" Without {GPU_MEMORY_KEY} the engine's share is not counted in the peak."


@dataclass
class MemoryPlan:
    """The estimates of every training job of one config."""

    estimates: list[Estimate]

    def table(self) -> str:
        s, j = self.estimates[0].shape, self.estimates[0].job
        dtype = {4: "fp32", 2: "bf16"}[j.compute_bytes]
        title = (
            f"Memory plan per GPU of each training job (GiB): {s.source}, {s.params:.3g} "
            f"parameters; {describe(j)}; fp32 weights, gradients and AdamW state, {dtype} "
            f"compute; sequences of {j.seq_len} tokens; {engine_note(j)}."
        )
        rows = [HEAD] + [self._row(e) for e in self.estimates]
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
        aligned = [
            "  "
            + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        return "\n".join([title, *aligned, LEGEND + unplanned_engine_note(j)])

    @staticmethod
    def _row(e: Estimate) -> list[str]:
        j = e.job
        star = ("*", "") if j.gradient_checkpointing else ("", "*")
        known = j.backend == "hf" or j.gpu_memory_gb
        engine = gib(e.engine_awake) if known else f"{j.engine_share:.0%}"
        limit = fits = "-"
        if j.gpu_memory_gb is not None:
            limit = f"{j.gpu_memory_gb:g}"
            fits = "yes" if e.peak() <= j.gpu_memory_gb * GIB else "NO"
        sizes = [e.weights, e.grads, e.optimizer, e.compute, e.reference]
        return [j.label, str(j.seqs), *map(gib, sizes), gib(e.critic) if e.critic else "-", engine,
                gib(e.act_ckpt) + star[0], gib(e.act_full) + star[1], gib(e.other), gib(e.peak()),
                e.peak_phase, limit, fits]  # fmt: skip

    def check(self) -> None:
        """Raises MemoryPlanError naming the settings to change when a job cannot fit."""
        problems = [p for e in self.estimates for p in (engine_problem(e), fit_problem(e)) if p]
        if problems:
            raise MemoryPlanError("\n\n".join(problems))


def engine_problem(e: Estimate) -> str | None:
    """vLLM must hold the weights (bf16) and the KV cache of one whole sequence in its share;
    the hf engine samples from the policy, which fsdp shards (the trainer refuses it)."""
    j = e.job
    if j.backend == "hf" and j.distributed == "fsdp":
        return (
            f"memory plan: training job '{j.label}': the hf engine (generation.train_backend, or generation.backend) samples from the "
            "policy, which resources.train.distributed: fsdp shards; the trainer refuses it: use vllm, "
            "or resources.train.distributed: ddp or deepspeed"
        )
    if j.backend != "vllm" or j.gpu_memory_gb is None:
        return None
    need = e.shape.params * 2 + j.seq_len * kv_bytes_per_token(e.shape) + GIB
    if e.engine_awake >= need:
        return None
    return (
        f"memory plan: training job '{j.label}': the generation engine's share, generation.vllm."
        f"gpu_memory_utilization = {j.engine_share:g} of {j.gpu_memory_gb:g} GiB = {gib(e.engine_awake)} GiB, "
        f"cannot hold the model's bf16 weights ({gib(e.shape.params * 2)} GiB) and the KV cache of one "
        f"{j.seq_len}-token sequence; raise it to at least {need / (j.gpu_memory_gb * GIB):.2f}."
    )


def fit_problem(e: Estimate) -> str | None:
    j = e.job
    if j.gpu_memory_gb is None or e.peak() <= j.gpu_memory_gb * GIB:
        return None
    if e.peak_phase == "generate":
        terms = [
            ("weights", e.weights),
            ("kept gradients", e.grads_kept),
            ("optimizer", e.optimizer),
            ("reference", e.reference),
            ("critic", e.critic - e.critic_update_only),
            ("engine", e.engine_awake + e.engine_generating),
        ]
    else:
        terms = [
            ("weights", e.weights),
            ("gradients", e.grads),
            ("optimizer", e.optimizer),
            ("compute copies", e.compute),
            ("reference", e.reference),
            ("critic", e.critic),
            ("engine", e.engine_asleep),
            ("activations", e.activations),
        ]
    parts = " + ".join(f"{name} {gib(b)}" for name, b in terms + [("other", e.other)] if b)
    return (
        f"memory plan: training job '{j.label}' needs about {gib(e.peak())} GiB on each GPU, more than "
        f"{GPU_MEMORY_KEY} = {j.gpu_memory_gb:g} ({describe(j)}; {e.peak_phase} phase: {parts} GiB). "
        f"To fit, change:\n" + "\n".join(f"  {s}" for s in suggestions(e))
    )


def suggestions(e: Estimate) -> list[str]:
    """One line per setting that would bring the job under the limit, with the new peak."""
    j, limit = e.job, e.job.gpu_memory_gb * GIB
    out = []
    for n in (2, 4, 8):
        alt = estimate(e.shape, replace(j, gpus=n, distributed="fsdp"))
        if alt.peak() <= limit or n == 8:
            tail = "" if alt.peak() <= limit else " (still too much)"
            out.append(
                f"resources.train.gpu: {n} with resources.train.distributed: fsdp -> {gib(alt.peak())} GiB{tail}"
            )
            break
    if not j.gradient_checkpointing:
        out.append(f"train.gradient_checkpointing: true -> {gib(e.peak(checkpointing=True))} GiB")
    for m in [
        m for m in range(j.micro_batch_size - 1, 0, -1) if j.batch_size % (m * j.shards) == 0
    ]:
        alt = estimate(e.shape, replace(j, micro_batch_size=m))
        if alt.peak() <= limit or m == 1:
            tail = "" if alt.peak() <= limit else " (still too much)"
            out.append(
                f"train.micro_batch_size: {m} (now {j.micro_batch_size}) -> {gib(alt.peak())} GiB{tail}"
            )
            break
    if j.backend == "vllm" and e.peak_phase == "generate":
        out.append(
            f"generation.vllm.gpu_memory_utilization (now {j.engine_share:g}): the engine holds "
            f"{gib(e.engine_awake)} GiB while generating"
        )
    elif j.backend == "vllm" and not j.engine_sleeps:
        out.append(
            "generation.vllm.sleep: true, so that the engine frees its share during the update"
        )
    return out


def memory_plan(config: dict, trains: dict[str, str], model_dir: str) -> MemoryPlan | None:
    """The plan of every training job ({label: method}) of a validated config; None when the
    model's size is unknown and no limit asks for a check."""
    try:
        shape = model_shape(config, model_dir)
    except MemoryPlanError:
        if config["resources"]["train"].get("gpu_memory_gb") is None:
            return None
        raise
    return MemoryPlan(
        [estimate(shape, job_from_config(config, label, m)) for label, m in trains.items()]
    )


def workflow_plan(config: dict, trains: dict[str, str], model_dir: str, show) -> MemoryPlan | None:
    """What the workflow runs before planning jobs: `show` the table, then check it."""
    plan = memory_plan(config, trains, model_dir)
    if plan is None:
        show(
            f"Memory plan: none, the size of model '{config['model']}' is unknown here "
            f"(set {MODEL_PARAMS_KEY} to plan it)."
        )
        return None
    show(plan.table())
    plan.check()
    return plan


def plan_from_files(
    paths: list[str], results: str = "results", gpu_memory_gb: float | None = None
) -> MemoryPlan:
    """`apo plan`: the plan of config files (merged in order), not yet checked; raises
    MemoryPlanError when the model's size is unknown."""
    from apo.config import load_yaml, merge, validate_config
    from apo.settings import Plan, model_path

    raw: dict = {}
    for path in paths:
        raw = merge(raw, load_yaml(path) or {})
    config = validate_config(raw, source=" + ".join(paths))
    if gpu_memory_gb is not None:
        config["resources"]["train"]["gpu_memory_gb"] = gpu_memory_gb
    plan = Plan(config, results)
    trains = {label: s.settings["method"] for label, s in plan.trains.items()}
    out = memory_plan(config, trains, model_path(plan.model))
    if out is None:
        raise MemoryPlanError(model_shape_error(config["model"]))
    return out
