"""One small generation interface, used by reference sampling, training and evaluation.

A backend turns chat-formatted prompt strings into `n` completions each:
- `VLLMGenerator`: a vLLM engine in this process (the default wherever vLLM is installed);
  in training it receives the new weights after every optimizer step, in memory.
- `HFGenerator`: batched `transformers` `generate`, the reference implementation.

Both tokenize the prompt and decode the response with the same Hugging Face tokenizer, so
their outputs are comparable token for token (tests/test_vllm.py checks greedy parity).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from apo.config import vllm_available


@dataclass(frozen=True)
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    @classmethod
    def from_config(cls, section: dict, n: int | None = None) -> "SamplingSettings":
        """A sampling section's settings; `n` for a section that names its count otherwise
        (`evaluate.k`, read by `apo.sample.run_shard`)."""
        return cls(
            n=n if n is not None else section["n"],
            temperature=section["temperature"],
            top_p=section["top_p"],
            max_new_tokens=section["max_new_tokens"],
        )


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # response tokens, including the end-of-turn token when it ended
    finished: bool  # ended with an end-of-sequence token (not cut at max_new_tokens)
    logprobs: list[float] | None = None  # log pi(y_t | x, y_<t) of each token, when asked for


class Generator(Protocol):
    def generate(
        self, prompts: Sequence[str], sampling: SamplingSettings, progress: bool = True,
        seed: int | None = None, logprobs: bool = False,
    ) -> list[list[Completion]]:
        """`n` completions for every prompt, in prompt order. `seed` reseeds the sampler
        for this call (training passes one per step, so that a resumed run draws exactly what
        the uninterrupted run drew); `logprobs` fills `Completion.logprobs`."""

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""

    def sleep(self) -> None:
        """Free what the engine can while the trainer updates (woken by the next call)."""


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The model's end-of-sequence ids (its generation config's, plus the tokenizer's)."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


class HFGenerator:
    """Batched `model.generate` with left padding.

    It samples from the very model object it is given, so in training the weights are always
    current and `sync_weights` has nothing to do.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = stop_token_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingSettings, progress: bool = True, seed=None, logprobs=False):
        if seed is not None:
            torch.manual_seed(seed)
        tok, model = self.tokenizer, self.model
        was_training = model.training
        model.eval()
        out: list[list[Completion]] = []
        # One batch holds batch_size sequences in all, i.e. batch_size // n prompts.
        per_batch = max(1, self.batch_size // sampling.n)
        starts = range(0, len(prompts), per_batch)
        for start in tqdm(starts, desc="generate (hf)", disable=not progress, mininterval=2):
            chunk = list(prompts[start : start + per_batch])
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            greedy = sampling.temperature == 0
            recorder = SampledLogprobs(1.0 if greedy else sampling.temperature) if logprobs else None
            seqs = model.generate(
                **enc,
                logits_processor=[recorder] if recorder else None,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else 0,
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=sampling.n,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
            )
            new = seqs[:, enc["input_ids"].shape[1] :]
            lps = recorder.finish(new).tolist() if recorder else [None] * len(new)
            new = new.tolist()
            for i in range(len(chunk)):
                rows = range(i * sampling.n, (i + 1) * sampling.n)
                out.append([self._completion(new[j], lps[j]) for j in rows])
        model.train(was_training)
        return out

    def _completion(self, ids: list[int], logprobs: list[float] | None = None) -> Completion:
        finished = False
        for pos, t in enumerate(ids):
            if t in self.stop_ids:
                ids, finished = ids[: pos + 1], True
                break
        lps = None if logprobs is None else logprobs[: len(ids)]
        return Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, finished, lps)

    def sync_weights(self, model) -> None:
        assert model is self.model, "the hf backend samples from the model it was built with"

    def sleep(self) -> None:
        pass  # nothing of its own: it is the policy


def process_engine_args(environ) -> dict:
    """The engine arguments that place one engine in each process of a multi-process job.

    vLLM's default in-process executor reads no rank: it builds its worker on device index 0
    (vllm/v1/executor/uniproc_executor.py, `_distributed_args`), whose `init_device` then makes
    `cuda:0` the process's current device (vllm/v1/worker/gpu_worker.py), so every rank's
    engine would load onto GPU 0. The `external_launcher` executor is vLLM's executor for one
    engine per torchrun process: it takes RANK and LOCAL_RANK from the environment, joins the
    process group the launcher made (each engine is then its own tensor-parallel group of one,
    vllm/distributed/parallel_state.py, `initialize_model_parallel`) and puts its worker on
    `cuda:LOCAL_RANK`. It needs in-process execution, which this class sets anyway."""
    if int(environ.get("WORLD_SIZE", 1)) <= 1:
        return {}
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is {environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
                           "start a multi-process job with `accelerate launch` or torchrun")
    return {"distributed_executor_backend": "external_launcher"}


def engine_cache_root(environ) -> str | None:
    """vLLM's cache root (compiled graphs among others) for this process in a multi-process
    job: the configured one (VLLM_CACHE_ROOT, else vLLM's default under XDG_CACHE_HOME or
    ~/.cache, vllm/envs.py) with a folder per rank, so that the engines of one node never
    compile into the same files at once. None in a single-process job (vLLM's own choice)."""
    if int(environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    root = os.path.expanduser(environ.get("VLLM_CACHE_ROOT") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "vllm"))
    mine = f"rank-{environ.get('RANK', 0)}"
    return root if os.path.basename(root) == mine else os.path.join(root, mine)  # set once per process


class SampledLogprobs:
    """A logits processor that records, during `generate`, the log-prob of each sampled token
    under the distribution it was drawn from: log_softmax(logits / temperature) at every step.

    transformers applies custom processors before its temperature and top-p warpers, so the
    temperature is applied here; top-p truncation is not (the trainer's log-probs have none
    either). Only one step's [B, V] log-probs are held at a time: at each call the previous
    step's row is read at the token just sampled, the last step's in `finish`."""

    def __init__(self, temperature: float):
        self.temperature, self.steps, self.pending = temperature, [], None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, new_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] log-probs of the generated tokens `new_ids` (T = the steps generated)."""
        if self.pending is not None and len(self.steps) < new_ids.shape[1]:
            self.steps.append(self.pending.gather(-1, new_ids[:, len(self.steps) : len(self.steps) + 1]).squeeze(-1))
        self.pending = None
        return torch.stack(self.steps, dim=1).cpu() if self.steps else new_ids.new_zeros(new_ids.shape, dtype=torch.float)


@dataclass(frozen=True)
class VLLMSettings:
    """Engine knobs that change speed and memory, never what is sampled."""

    gpu_memory_utilization: float = 0.3  # GPU: fraction of memory for weights + KV cache
    cpu_kvcache_gib: float | None = None  # CPU: KV cache size; None: what the batch needs, at most 1 GiB
    sleep: bool = True  # GPU, training: free the KV cache during the update (sleep mode)
    enforce_eager: bool = False

    @classmethod
    def from_runtime(cls, generation: dict) -> "VLLMSettings":
        return cls(**generation.get("vllm", {}))


CPU_MAX_NUM_SEQS = 256  # vLLM's default on a CPU for the LLM class (engine/arg_utils.py)
# Tokens per KV block on a CPU: the smallest the CPU attention kernels take (multiples of 32,
# vllm/v1/attention/backends/cpu_attn.py `get_supported_kernel_block_sizes`; vLLM's CPU default
# is 128). Short sequences waste less of their last block, so the same sequences fit a smaller
# cache. The block size changes which tokens are drawn, not from what: prefix caching shares
# whole blocks, so the prefills and the sampler's batches differ (docs/engines.md).
CPU_KV_BLOCK = 32
CPU_KV_CAP = 1 << 30  # the most the cache takes unless generation.vllm.cpu_kvcache_gib says more


def cpu_kv_cache_bytes(model_path: str, max_model_len: int, settings: VLLMSettings) -> int:
    """The CPU engine's KV cache: the configured GiB, or else room for vLLM's most concurrent
    sequences (256) at the full context in blocks of CPU_KV_BLOCK tokens, in float32, capped
    at 1 GiB. vLLM allocates and touches the whole cache, so a fixed 1 GiB was most of a small
    model's training job's memory; a cache that holds every sequence the engine would schedule at once schedules
    the same batches as a larger one, so what is sampled does not change."""
    if settings.cpu_kvcache_gib is not None:
        return int(settings.cpu_kvcache_gib * (1 << 30))
    from transformers import AutoConfig

    from apo.memory import ModelShape, kv_bytes_per_token

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_path).to_dict(), model_path)
    blocks = -(-max_model_len // CPU_KV_BLOCK) + 1  # one spare
    return min(CPU_MAX_NUM_SEQS * blocks * CPU_KV_BLOCK * kv_bytes_per_token(shape, 4), CPU_KV_CAP)  # float32


# The rendezvous files of the engines this process started (`remove_rendezvous_files`).
_RENDEZVOUS_FILES: list[Path] = []


def rendezvous_file(llm) -> Path | None:
    """The file an in-process engine's one-rank process group met through: vLLM's single-process
    executor rendezvouses through a torch FileStore under the temp directory
    (vllm/v1/executor/uniproc_executor.py, `_distributed_args`), which torch deletes only when
    the store is destroyed. None where the engine did not use one."""
    try:
        method = llm.llm_engine.model_executor.driver_worker.worker.distributed_init_method
    except AttributeError:
        return None
    return Path(method.removeprefix("file://")) if str(method).startswith("file://") else None


def remove_rendezvous_files() -> None:
    """Delete the rendezvous files of this process's engines. For a process that leaves without
    the interpreter's teardown (`apo.cli.run`), which is when torch would delete them: else
    every job leaves one in the node's temp directory. Only at exit: the store is read until
    the process group goes away."""
    while _RENDEZVOUS_FILES:
        _RENDEZVOUS_FILES.pop().unlink(missing_ok=True)


class VLLMGenerator:
    """A vLLM engine in this process, seeded, with prefix caching (the n samples of a prompt
    and the prompts of a batch share their chat-template prefix).

    The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): its sampler then draws from
    this process's torch RNG, so `generate(seed=...)` makes a call reproducible, and
    `sync_weights` can hand it the trained tensors directly (no disk, no copy to another
    process). Prompts go in as token ids from our tokenizer and responses are decoded by it, so
    both backends see and return the same tokens.
    """

    def __init__(
        self, model_path: str, tokenizer, *, seed: int, max_model_len: int, stop_ids: list[int],
        dtype: str = "auto", settings: VLLMSettings = VLLMSettings(), device: str | None = None,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM's legacy variable would override the size passed below (whole GiB only)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        if (cache_root := engine_cache_root(os.environ)) is not None:
            os.environ["VLLM_CACHE_ROOT"] = cache_root
        from vllm import LLM

        from apo.engine_threads import EngineThreads

        trainer_threads = EngineThreads.capture()
        self.tokenizer, self.settings = tokenizer, settings
        self.dtype = getattr(torch, dtype) if dtype != "auto" else None  # of the tensors sync_weights passes
        self.on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.stop_ids = stop_ids
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_memory_bytes=None if self.on_gpu else cpu_kv_cache_bytes(model_path, max_model_len, settings),
            block_size=None if self.on_gpu else CPU_KV_BLOCK,
            enable_sleep_mode=self.on_gpu and settings.sleep,
            enforce_eager=settings.enforce_eager,
            **process_engine_args(os.environ),
            # log-probs of the distribution sampled from (after temperature and top-p), as the
            # trainer scores them; vLLM's default is the raw logits' log_softmax
            logprobs_mode="processed_logprobs",
        )
        self.restored = trainer_threads.restore()  # the process's threads as they were (apo.engine_threads)
        # an engine started where a process group exists joins it and creates no file
        if (store := rendezvous_file(self.llm)) is not None and store.exists():
            _RENDEZVOUS_FILES.append(store)
        self.asleep = False

    def generate(self, prompts, sampling: SamplingSettings, progress: bool = True, seed=None, logprobs=False):
        from vllm import SamplingParams, TokensPrompt

        self.wake_up()
        if seed is not None:
            torch.manual_seed(seed)  # the in-process engine samples with this RNG
        greedy = sampling.temperature == 0
        params = SamplingParams(
            n=sampling.n,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=self.stop_ids,
            logprobs=0 if logprobs else None,  # 0: just the sampled token's log-prob
            detokenize=False,  # decoded below by our tokenizer, exactly as the hf backend does
        )
        inputs = [
            TokensPrompt(prompt_token_ids=self.tokenizer(p, add_special_tokens=False)["input_ids"])
            for p in prompts
        ]
        results = self.llm.generate(inputs, params, use_tqdm=progress)
        return [[self._completion(o, logprobs) for o in r.outputs] for r in results]

    def _completion(self, out, logprobs: bool) -> Completion:
        ids = list(out.token_ids)
        lps = None
        if logprobs:
            lps = [step[t].logprob for step, t in zip(out.logprobs, ids)]
        return Completion(
            self.tokenizer.decode(ids, skip_special_tokens=True), ids, out.finish_reason == "stop", lps
        )

    def sleep(self) -> None:
        """GPU: free the KV cache and offload the weights while the trainer needs the memory."""
        if self.on_gpu and self.settings.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push `model`'s weights into the engine; a sharded (FSDP) model's are gathered one
        tensor at a time in the engine's dtype while the engine loads them, so neither a second
        full float32 copy nor a full list of gathered tensors is ever held."""
        from apo.sharding import full_weights

        self.wake_up()
        self.load_weights(full_weights(model, self.dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Overwrite the engine's weights in place from (name, tensor) pairs named as in the
        Hugging Face checkpoint; vLLM maps them onto its fused layers, consuming the pairs one
        by one (the engine runs in this process, so a lazy iterator is passed as it is)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights


def make_generator(
    backend: str, tokenizer, *, model=None, model_path: str | None = None, batch_size: int = 64,
    seed: int = 0, max_model_len: int = 2048, vllm: VLLMSettings = VLLMSettings(), dtype: str | None = None,
) -> Generator:
    """The configured backend. hf samples from `model` itself; vLLM loads its own copy of
    `model_path`, in `dtype` if given, else in `model`'s dtype (so that a synced policy fits it
    exactly); a trainer with float32 master weights and bfloat16 compute passes "bfloat16".

    `backend` is what the stage's address names: `auto` was resolved once, when the config was
    validated (`apo.config.validate_config`), so a job samples with the engine its address says
    or fails naming it."""
    if backend == "hf":
        if model is None:
            raise ValueError("the hf backend needs the transformers model")
        return HFGenerator(model, tokenizer, batch_size)
    if backend != "vllm":
        raise ValueError(f"generation.backend: unknown backend {backend!r} (expected vllm or hf, auto resolved)")
    if not vllm_available():
        raise RuntimeError(
            "this stage's address names the vllm engine (generation.backend, where `auto` was resolved "
            "on the planning host) but vLLM is not installed here: install envs/cpu.txt (CPU) or "
            "envs/gpu.txt (GPU) on every node, or set generation.backend (for training: generation.train_backend) to hf"
        )
    from transformers import GenerationConfig

    if model is not None:
        gen_config, p = model.generation_config, next(model.parameters())
        dtype, device = dtype or str(p.dtype).removeprefix("torch."), p.device.type
    else:
        try:
            gen_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS is the stop token
            gen_config = None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    return VLLMGenerator(
        model_path, tokenizer, seed=seed, max_model_len=max_model_len, dtype=dtype,
        stop_ids=stop_token_ids(tokenizer, gen_config), settings=vllm, device=device,
    )
