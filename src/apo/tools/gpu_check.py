"""The GPU check: what a training step of each method costs at the size of Qwen2.5-1.5B.

One command (`scripts/gpu-check.sh`) builds, on the machine it runs on, a randomly
initialised model with Qwen2.5-1.5B's exact architecture and a synthetic tokenizer that
decodes every id (nothing is downloaded), then trains A*-PO, GRPO, REBEL and PPO with the
project's own trainer (`apo.train.setup` and `apo.train.train_step`, the functions
`train.train` runs every step) on the same prompts, a few steps each, and reports per-phase
seconds per step, CUDA peak memory (allocated and reserved) and ratios to A*-PO as one
table, printed and written to `gpu-check.json` and `gpu-check.md`.

Settings are the paper config's (`config/paper/qwen2.5-1.5b.yaml`: float32 master weights and
AdamW state, bf16 autocast, the reference's dtype, mini-batches, the methods' hyperparameters),
with only the sizes made to fit a few minutes: prompts per step, response length, steps. The
generation engine is transformers' (`hf`); tracking is off. Random weights rarely emit EOS,
so responses run to the length limit and every method's lengths are the same.

Each method trains in a process of its own: CUDA's peak counters, its cached blocks and the
allocator's fragmentation then belong to that method alone, which is what makes the peak
columns comparable. `--tiny` runs the same code with a small model on the CPU in about a
minute on two cores (tests/test_gpu_check.py runs it in CI).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from apo import methods
from apo.memory import KNOWN_MODELS, ModelShape

ROOT = Path(__file__).resolve().parents[3]
PAPER_CONFIG = ROOT / "config" / "paper" / "qwen2.5-1.5b.yaml"
# One method of each family, in the registry's order: A*-PO first, every ratio is to it.
METHODS = tuple(methods.timed_by_default())
REFERENCE = methods.get(methods.REFERENCE)
GB = 1024  # MiB per GiB: the trainer reports MiB, the table GiB (called GB, as in the report)


# Qwen/Qwen2.5-1.5B as the memory plan knows it (its config.json); with tied embeddings it
# has this many parameters.
QWEN25_1_5B = KNOWN_MODELS["Qwen/Qwen2.5-1.5B"]
QWEN25_1_5B_PARAMETERS = 1_543_714_304


@dataclass(frozen=True)
class Profile:
    """The sizes of one check. `prompts` is train.batch_size: every step trains on all of them
    (a new order each step), so every method sees the same prompts."""

    name: str
    device: str
    arch: ModelShape
    prompts: int
    mini_batch_size: int
    micro_batch_size: int
    response_tokens: int
    steps: int  # warm-up included
    warmup: int  # steps left out of the medians (first-call kernels, allocator growth)
    generation_batch: int  # sequences per generate call: 128 puts GRPO's 16 x 8 in one call
    grading_workers: int
    budget_s: float  # the whole check; methods that would start later are skipped
    bpe_vocab: int = 400  # merges learnt from the prompts; the rest of the vocabulary is filler


FULL = Profile("full", "cuda", QWEN25_1_5B, prompts=16, mini_batch_size=8, micro_batch_size=1,
               response_tokens=512, steps=3, warmup=1, generation_batch=128, grading_workers=8,
               budget_s=420)
TINY = Profile("tiny", "cpu", ModelShape(64, 2, 4, 2, 128, 1024, tie_word_embeddings=True), prompts=2,
               mini_batch_size=1, micro_batch_size=1, response_tokens=8, steps=2, warmup=1,
               generation_batch=32, grading_workers=1, budget_s=600)


# --------------------------------------------------------------------------- inputs


def filler_token(i: int) -> str:
    """The i-th filler token: a space and four or more lowercase letters (byte-level BPE's
    "Ġ" is the space). Letters only, so random responses hold no numbers or LaTeX for the
    grader to chew on, and every token decodes to plain text."""
    i += 26**3  # four letters at least
    letters = []
    while i:
        i, r = divmod(i, 26)
        letters.append(chr(97 + r))
    return "Ġ" + "".join(letters)


def make_tokenizer(texts: list[str], vocab_size: int, bpe_vocab: int):
    """The demo's byte-level BPE (its special and chat-template tokens) trained on `texts`,
    its vocabulary filled up to exactly `vocab_size` with filler tokens that no merge
    produces: prompts tokenize as usual, and any id a random model samples decodes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from apo import demo

    spec = json.loads(demo.build_tokenizer(texts, bpe_vocab).backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if len(vocab) >= vocab_size:
        raise ValueError(f"vocab_size {vocab_size} leaves no room above the {len(vocab)} learnt tokens")
    i = 0
    while len(vocab) < vocab_size:
        token = filler_token(i)
        i += 1
        if token not in vocab:
            vocab[token] = len(vocab)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=demo.EOS, pad_token=demo.PAD,
        bos_token=None, chat_template=demo.CHAT_TEMPLATE, padding_side="left", model_max_length=32_768,
    )


# What Qwen2Config reads of a ModelShape (Qwen2 has q/k/v biases and head_dim hidden / heads).
CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "tie_word_embeddings")


def model_config(arch: ModelShape, tokenizer):
    """Qwen2 with `arch`'s sizes and the tokenizer's EOS and padding."""
    from transformers import Qwen2Config

    from apo import demo

    eos = tokenizer.convert_tokens_to_ids(demo.EOS)
    return Qwen2Config(
        **{f: getattr(arch, f) for f in CONFIG_FIELDS}, max_position_embeddings=32_768, rms_norm_eps=1e-6,
        eos_token_id=eos, bos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )


def build_model(arch: ModelShape, tokenizer, device: str, out: Path) -> int:
    """Randomly initialise the model on `device` (seconds on a GPU, minutes on a CPU at full
    size), save it in bfloat16 beside the tokenizer, and return its parameter count."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(model_config(arch, tokenizer))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def questions(n: int) -> list:
    """`n` word problems of the demo's task (answers math-verify parses)."""
    from apo import demo

    task = {"min_ops": 2, "max_ops": 3, "max_start": 9, "max_operand": 5}
    return demo.make_problems(n, seed=0, task=task)


def write_prompts(problems, tokenizer, prompt_cfg: dict, workdir: Path) -> dict:
    """prompts.parquet (apo.data's schema, formatted per the config's prompt.template) and a
    V* table for A*-PO (a constant: its value changes the loss, not the cost)."""
    import pandas as pd

    from apo.data import SCHEMA, format_prompt

    rows = [{"id": f"check-{i:04d}", "prompt": format_prompt(p.question, prompt_cfg, tokenizer),
             "question": p.question, "answer": str(p.answer), "source": "gpu-check"}
            for i, p in enumerate(problems)]
    prompts = pd.DataFrame(rows, columns=SCHEMA)
    prompts.to_parquet(workdir / "prompts.parquet")
    pd.DataFrame({"id": prompts["id"], "vstar": 0.25}).to_parquet(workdir / "vstar.parquet")
    # what the V* stage records beside its table (the trainer checks every prompt has a V*)
    (workdir / "counts.json").write_text(json.dumps({"prompts": len(prompts), "dropped_by_filter": 0}))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts["prompt"]]
    return {"prompts": str(workdir / "prompts.parquet"), "vstar": str(workdir / "vstar.parquet"),
            "prompt_tokens_mean": sum(lengths) / len(lengths)}


def build_inputs(profile: Profile, config: dict, workdir: Path) -> dict:
    """Model, tokenizer, prompts and V* table under `workdir`; what the workers read."""
    clock = time.perf_counter()
    problems = questions(profile.prompts)
    texts = [f"{p.question} {config['prompt']['instruction']}" for p in problems]
    tokenizer = make_tokenizer(texts, profile.arch.vocab_size, profile.bpe_vocab)
    n_params = build_model(profile.arch, tokenizer, profile.device, workdir / "model")
    inputs = write_prompts(problems, tokenizer, config["prompt"], workdir)
    return {**inputs, "model": str(workdir / "model"), "parameters": n_params,
            "build_s": time.perf_counter() - clock}


def quiet_progress_bars() -> None:
    """transformers' per-load progress bars would bury the check's own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- settings


def check_config(profile: Profile, config_path: Path, backend: str = "hf", train_resources: dict | None = None) -> dict:
    """The paper config, validated, with the check's sizes in place of the paper's: one
    process on the transformers engine unless `backend` and `train_resources` (resources.train:
    gpu, distributed, gpu_memory_gb) say otherwise."""
    from apo.config import load_yaml, validate_config

    raw = load_yaml(config_path)
    raw["methods"] = list(METHODS)
    raw["seeds"] = [0]
    raw["generation"] = {**raw.get("generation", {}), "backend": backend, "train_backend": None,
                         "batch_size": profile.generation_batch}
    resources = raw.setdefault("resources", {})
    resources["train"] = {**resources.get("train", {}), "gpu": 1, "gpu_memory_gb": None, **(train_resources or {})}
    raw["grading"] = {**raw.get("grading", {}), "workers": profile.grading_workers}
    raw["train"] = {
        **raw.get("train", {}), "batch_size": profile.prompts, "mini_batch_size": profile.mini_batch_size,
        "micro_batch_size": profile.micro_batch_size, "max_new_tokens": profile.response_tokens,
        "steps": profile.steps, "checkpoint_every": profile.steps,
    }
    return validate_config(raw, source=f"{config_path} (with the GPU check's sizes)", base_dir=ROOT)


def method_settings(config: dict, method: str) -> dict:
    """The settings the pipeline's training job for `method` would get."""
    from apo.settings import Plan

    return Plan(config).trains[method].settings


# --------------------------------------------------------------------------- one method (worker)


def measure(job: dict) -> dict:
    """Train one method for job["settings"]["steps"] steps; per-step rows of the trainer
    (with CUDA's reserved peak added; its phase clock waits for the GPU) and what the run was
    made of."""
    import torch

    from apo import train as T
    from apo.reward import Grader

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter()
    t = T.setup(job["settings"], job["model"], job["prompts"], job["vstar"], Path(job["out_dir"]),
                job["generation"], job["gradient_checkpointing"])
    setup_s = time.perf_counter() - clock
    rows = []
    with Grader.from_settings(job["settings"], job["grading"]["workers"]) as grader:
        for step in range(job["settings"]["steps"]):
            row = T.train_step(t, grader, step)
            row["peak_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
            rows.append(row)
    return {"setup_s": setup_s, "steps": rows, **precision(t)}


def precision(t) -> dict:
    """Where the trained weights, the AdamW state and the reference live, and in which dtype:
    the evidence that the run used the recipe (float32 master weights and state)."""
    param = next(t.policy.parameters())
    states = [v for s in t.optimizer.state.values() for v in s.values() if hasattr(v, "dtype") and v.dim() > 0]
    return {
        "device_name": _device_name(param.device),
        "policy_dtype": str(param.dtype).removeprefix("torch."),
        "adam_state_dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in states}),
        "reference_dtype": str(next(t.reference.parameters()).dtype).removeprefix("torch."),
        "mixed_precision": str(t.accelerator.mixed_precision),
    }


def _device_name(device) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


def worker_main(job_path: str) -> None:

    quiet_progress_bars()
    job = json.loads(Path(job_path).read_text())
    result = measure(job)
    Path(job["result"]).write_text(json.dumps(result, indent=1))


# --------------------------------------------------------------------------- the check (driver)


def run_method(job: dict, workdir: Path, timeout_s: float) -> dict:
    """One method in a fresh process, in a process group of its own so that stopping it
    stops its grading workers too (a group, not a session: whatever ends the check's own
    command still ends them); returns its result or a status saying why there is none."""
    job_path = workdir / f"job-{job['method']}.json"
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --tiny on a GPU machine still measures the CPU
    cmd = [sys.executable, "-m", "apo.tools.gpu_check", "--worker", str(job_path)]
    clock = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, preexec_fn=os.setpgrp)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s (the check's time budget)"}
    finally:
        if proc.poll() is None:  # timed out, or the check itself was interrupted
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - clock
    if code != 0 or not Path(job["result"]).exists():
        return {"status": f"failed (exit code {code}; its traceback is above)", "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **json.loads(Path(job["result"]).read_text())}


def summarize(result: dict, warmup: int, responses: int) -> dict:
    """Medians over the timed steps of every phase and of the step; peaks over the run."""
    from apo.report import PHASES

    timed = result["steps"][warmup:] or result["steps"]

    def median(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in timed)

    last = result["steps"][-1]  # the trainer's and CUDA's peaks are maxima since the start
    reserved = last.get("peak_reserved_mb")
    return {
        "phases_s": {phase_key(col): median(col) for col, _ in PHASES},
        "step_s": median("time_step_s"),
        "peak_allocated_gb": last["peak_memory_mb"] / GB,
        "peak_reserved_gb": None if reserved is None else reserved / GB,
        "responses_per_step": responses,
        "response_length": median("response_length"),
        "truncated": median("truncated"),
        "tokens_per_step": median("tokens"),
        "timed_steps": len(timed),
    }


def add_ratios(rows: dict) -> None:
    """Each method's step time and peaks as multiples of the reference method's (A*-PO's)."""
    base = rows.get(REFERENCE.name, {})
    for row in rows.values():
        if row.get("status") != "ok":
            continue
        for key in ("step_s", "peak_allocated_gb", "peak_reserved_gb"):
            ok = base.get("status") == "ok" and row.get(key) is not None and base.get(key)
            row[f"{key}_vs_{REFERENCE.name}"] = row[key] / base[key] if ok else None


def phase_key(column: str) -> str:
    """"generate" for the trainer's column "time_generate_s"."""
    return column.removeprefix("time_").removesuffix("_s")


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _ratio(row: dict, key: str) -> str:
    return _num(row[f"{key}_vs_{REFERENCE.name}"], ".2f")


def markdown_table(rows: dict, order: list[str]) -> str:
    """One row per method: seconds per step by phase (median of the timed steps), the step,
    peak memory, and ratios to A*-PO."""
    from apo.report import PHASES

    times = f"× {REFERENCE.display}"
    head = (["method", "responses / step"] + [f"{label} (s)" for _, label in PHASES]
            + ["step (s)", times, "peak allocated (GB)", times, "peak reserved (GB)", times])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in order:
        row, name = rows[method], methods.get(method).display
        if row.get("status") != "ok":
            lines.append(f"| {name} | {row['status']} |" + " |" * (len(head) - 2))
            continue
        cells = [name, str(row["responses_per_step"])]
        cells += [f"{row['phases_s'][phase_key(col)]:.2f}" for col, _ in PHASES]
        cells += [f"{row['step_s']:.2f}", _ratio(row, "step_s"), f"{row['peak_allocated_gb']:.2f}",
                  _ratio(row, "peak_allocated_gb"), _num(row["peak_reserved_gb"], ".2f"), _ratio(row, "peak_reserved_gb")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(report: dict) -> str:
    """The Markdown file: what ran, the table, and what the table does not show."""
    p, r = report["profile"], report["run"]
    arch = p["arch"]
    memory = f" ({r['device_memory_gb']:.0f} GB)" if r.get("device_memory_gb") else ""
    lines = [
        f"# GPU check ({p['name']}): {r['device_name']}{memory}, {r['date']}",
        "",
        f"Random-weight Qwen2 model, {report['inputs']['parameters']:,} parameters (hidden "
        f"{arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
        f"{arch['num_key_value_heads']} KV heads, intermediate {arch['intermediate_size']}, vocabulary "
        f"{arch['vocab_size']:,}, tied embeddings); {p['prompts']} prompts per step (the same for every "
        f"method, about {report['inputs']['prompt_tokens_mean']:.0f} tokens each), responses of "
        f"{p['response_tokens']} tokens at most, mini-batches of {p['mini_batch_size']} prompts, "
        f"micro-batches of {p['micro_batch_size']}; {p['steps']} steps per method, the first "
        f"{p['warmup']} not timed; settings of `{r['config']}` otherwise (compute "
        f"{r['compute_dtype']}, reference {r['reference_dtype']}, gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'}); transformers engine; torch {r['torch']}, "
        f"transformers {r['transformers']}. Each method ran in a process of its own.",
        "",
        markdown_table(report["methods"], report["order"]),
        "",
        "Seconds are medians over the timed steps; peaks are CUDA's allocator maxima over the "
        "whole run of the method (model load included). On a CPU the allocated column is the "
        "process's peak resident memory and there is no reserved column.",
        "",
        "Not shown here: generation runs on transformers' engine (vLLM is not on the machine), where "
        f"A*-PO's one response per prompt decodes at low occupancy ({occupancy(report)}, for about "
        "the same time per decoding step), so A*-PO's generation advantage is understated. Random "
        "weights rarely emit EOS, so every response runs to the length limit.",
    ]
    return "\n".join(lines) + "\n"


def occupancy(report: dict) -> str:
    """"N sequences per call against GRPO's M" (the method that samples the most), from the
    rows that ran."""
    n = {m: row.get("responses_per_step") for m, row in report["methods"].items() if row.get("responses_per_step")}
    most = max(n, key=n.get, default=None)
    if REFERENCE.name in n and most != REFERENCE.name:
        return f"{n[REFERENCE.name]} sequences per call against {methods.get(most).display}'s {n[most]}"
    return "one sequence per prompt against a group"


def write_report(out: Path, report: dict) -> None:
    from apo.io import write_json, write_text

    write_json(out / "gpu-check.json", report)
    write_text(out / "gpu-check.md", describe(report))


# --------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", help="folder for gpu-check.json and gpu-check.md (default: $OUT, "
                    "else ./gpu-check)")
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (seconds; what CI runs)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="override the profile's device")
    ap.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: all of them; "
                    f"with --gpus: {methods.REFERENCE})")
    ap.add_argument("--gpus", metavar="N", help="the multi-GPU mode (apo.tools.gpu_check_multi): N >= 2 training "
                    "processes, one per GPU, under FSDP with a vLLM engine each; auto: every visible GPU")
    ap.add_argument("--config", default=str(PAPER_CONFIG), help="the config whose train settings are used")
    ap.add_argument("--prompts", type=int, help="prompts per step (train.batch_size; with --gpus: per GPU)")
    ap.add_argument("--response-tokens", type=int, help="response length limit (train.max_new_tokens)")
    ap.add_argument("--steps", type=int, help="steps per method, the first one a warm-up")
    ap.add_argument("--budget-s", type=float, help="time budget of the whole check, model build included")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in the backward pass (the paper config: off)")
    ap.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def choose_profile(args) -> Profile:
    profile = TINY if args.tiny else FULL
    changes = {k: v for k, v in {"device": args.device, "prompts": args.prompts, "steps": args.steps,
                                  "response_tokens": args.response_tokens, "budget_s": args.budget_s}.items()
               if v is not None}
    if args.prompts is not None:  # two mini-batches per step, as the paper's 256 / 128
        changes["mini_batch_size"] = max(1, args.prompts // 2)
    return replace(profile, **changes)


def out_dir(args) -> Path:
    out = Path(args.out or os.environ.get("OUT") or "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    return out


def preflight(profile: Profile) -> None:
    """Fail in a second, with the remedy, rather than after the model build."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "accelerate", "pandas", "pyarrow", "yaml", "jsonschema",
                           "math_verify") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu-check: missing Python packages {missing}; scripts/gpu-check.sh says how to "
                         "bring the small ones as wheels (pip download, then --wheels DIR)")
    import torch

    if profile.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here; run with --tiny for the CPU check")


def shown_path(path: str) -> str:
    """A path inside the repository as the repository names it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def run_report(profile: Profile, config: dict, config_path: str, args, inputs: dict) -> dict:
    import torch
    import transformers

    t = config["train"]
    return {
        "profile": asdict(profile),
        "inputs": {k: inputs[k] for k in ("parameters", "prompt_tokens_mean", "build_s")},
        "order": [],
        "run": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": shown_path(config_path),
                "device_name": _device_name(torch.device(profile.device)), "torch": torch.__version__,
                "transformers": transformers.__version__, "compute_dtype": t["compute_dtype"],
                "reference_dtype": t["reference_dtype"], "gradient_checkpointing": args.gradient_checkpointing,
                "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                "device_memory_gb": (torch.cuda.get_device_properties(0).total_memory / 2**30
                                     if profile.device == "cuda" else None)},
        "methods": {},
    }


def check(args) -> int:
    """Build the inputs, measure every method within the budget, write the report after each
    (a run cut short still leaves the methods it finished). Returns the exit code."""
    start = time.perf_counter()
    profile = choose_profile(args)
    names = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",") if m.strip()]
    preflight(profile)

    for name in names:
        methods.get(name)  # an unknown name fails here, naming the known ones
    out = out_dir(args)
    config = check_config(profile, Path(args.config))
    quiet_progress_bars()
    with tempfile.TemporaryDirectory(prefix="apo-gpu-check-") as tmp:
        workdir = Path(tmp)
        inputs = build_inputs(profile, config, workdir)
        print(f"gpu-check: {inputs['parameters']:,}-parameter model built in {inputs['build_s']:.1f} s", flush=True)
        report = run_report(profile, config, args.config, args, inputs)
        for method in names:
            job = make_job(method, profile, config, inputs, workdir, args.gradient_checkpointing)
            row = measure_one(job, profile, workdir, profile.budget_s - (time.perf_counter() - start))
            report["methods"][method] = row
            report["order"].append(method)
            add_ratios(report["methods"])
            write_report(out, report)
            print(f"gpu-check: {method}: {row['status']}", flush=True)
    print(describe(report))
    print(f"gpu-check: wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return 0 if all(r["status"] == "ok" for r in report["methods"].values()) else 1


def make_job(method: str, profile: Profile, config: dict, inputs: dict, workdir: Path,
             checkpointing: bool) -> dict:
    """What a worker needs to train `method`: the pipeline's settings for it and the inputs."""

    return {
        "method": method, "device": profile.device, "settings": method_settings(config, method),
        "model": inputs["model"], "prompts": inputs["prompts"],
        "vstar": inputs["vstar"] if methods.get(method).reads_vstar else None,
        "out_dir": str(workdir / f"run-{method}"),
        "generation": {"batch_size": config["generation"]["batch_size"]},
        "grading": {"workers": config["grading"]["workers"]},  # the runtime knob; the rest is in settings
        "gradient_checkpointing": checkpointing, "result": str(workdir / f"result-{method}.json"),
    }


def measure_one(job: dict, profile: Profile, workdir: Path, remaining: float) -> dict:
    """One method's row of the table (or its status, when it did not finish)."""

    if remaining < 20:
        return {"status": "skipped (the check's time budget is spent)"}
    result = run_method(job, workdir, remaining)
    if result["status"] != "ok":
        return result
    responses = profile.prompts * methods.get(job["method"]).samples(job["settings"])
    keep = {k: result[k] for k in ("status", "wall_s", "setup_s", "device_name", "policy_dtype",
                                   "adam_state_dtypes", "reference_dtype", "mixed_precision", "steps")}
    return {**keep, **summarize(result, profile.warmup, responses)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    # A terminated check unwinds (and stops the method it is running) instead of dying mid-way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.gpus:
        from apo.tools import gpu_check_multi

        return gpu_check_multi.check(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
