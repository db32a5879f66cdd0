"""The GPU check on a node of several GPUs: `scripts/gpu-check.sh --gpus N` (or `--gpus auto`).

Where the single-GPU check (apo.tools.gpu_check) trains each method in one process on the
transformers engine, this mode runs the paper's multi-GPU job shape: N training processes,
one per GPU, launched as the pipeline's training rule launches them (`accelerate launch
--config_file workflow/accelerate/fsdp.yaml --num_processes N`), each building the trainer with
`resources.train.distributed: fsdp` and its own colocated vLLM engine
(`generation.backend: vllm`), on the same random-weight Qwen2.5-1.5B-shaped model. Two training
steps per method run through `apo.train.train_step`, so every step generates, puts the engine to
sleep for the update, wakes it and pushes the gathered weights into it (the second step samples
from the synced engine).

Each rank then reports where its trainer, its policy's shards and its engine (the vLLM worker
and its weights) live, which must all be `cuda:LOCAL_RANK`, on a GPU no other rank uses (the
check fails otherwise), and its measured memory: CUDA's peak allocated bytes in the generation
and the update phase, the peak reserved, and the device's used memory (`cudaMemGetInfo`, which
sees vLLM's pool and the CUDA context too) sampled at the phase ends. Beside them: the memory
plan's per-GPU estimate of the same job (apo.memory, with this GPU's size as
resources.train.gpu_memory_gb, and the check's prompt length).

Without vLLM the colocated check cannot run (the trainer refuses fsdp with the transformers
engine over several processes, which samples from the local, sharded module); the mode says
so and runs what it can: ddp with the transformers engine (every rank holds the whole policy),
with the same per-rank placement check and the plan's ddp estimate.

`--tiny --gpus 2` runs the same code on the CPU with two processes (torchrun, gloo) and the
demo model's shape (tests/test_gpu_check_multi.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from apo import methods
from apo.memory import ModelShape
from apo.tools.gpu_check import GB, QWEN25_1_5B, ROOT, Profile

ACCELERATE_CONFIGS = ROOT / "workflow" / "accelerate"
DEFAULT_METHODS = (methods.REFERENCE,)
# Sizes per GPU: each rank trains on its own 8 prompts per step in two mini-batches.
FSDP = Profile("multi-gpu", "cuda", QWEN25_1_5B, prompts=8, mini_batch_size=4, micro_batch_size=1,
               response_tokens=512, steps=2, warmup=0, generation_batch=128, grading_workers=4,
               budget_s=540)
# The demo model's shape (config/config.yaml, demo.model), on the CPU.
FSDP_TINY = Profile("multi-gpu-tiny", "cpu", ModelShape(64, 4, 2, 2, 192, 512, tie_word_embeddings=True),
                    prompts=2, mini_batch_size=1, micro_batch_size=1, response_tokens=8, steps=2, warmup=0,
                    generation_batch=32, grading_workers=1, budget_s=300, bpe_vocab=300)
# On the CPU the engine gets a small KV cache and no compilation (as tests/test_fsdp.py runs it).
CPU_ENGINE = {"enforce_eager": True, "cpu_kvcache_gib": 1}


# --------------------------------------------------------------------------- plan of the run (pure)


def resolve_gpus(requested: str, visible: int, device: str) -> int:
    """The number of training processes: `requested` ("auto": every visible GPU), at least 2,
    at most the GPUs visible (on the CPU, any number: processes, not devices)."""
    if requested == "auto":
        if device == "cpu":
            return 2
        if visible < 2:
            raise SystemExit(f"gpu-check: --gpus auto needs 2 or more GPUs; {visible} visible here "
                             "(the one-GPU check: no --gpus)")
        return visible
    try:
        n = int(requested)
    except ValueError:
        raise SystemExit(f"gpu-check: --gpus {requested!r}: a number of GPUs (2 or more) or auto") from None
    if n < 2:
        raise SystemExit(f"gpu-check: --gpus {n}: the multi-GPU mode needs 2 or more (the one-GPU check: no --gpus)")
    if device == "cuda" and n > visible:
        raise SystemExit(f"gpu-check: --gpus {n}, but {visible} GPUs are visible here (CUDA_VISIBLE_DEVICES)")
    return n


def colocated_mode(vllm_installed: bool) -> dict:
    """How the ranks train: FSDP with a vLLM engine in every process where vLLM is installed,
    else ddp with the transformers engine, and the sentence saying which and why."""
    if vllm_installed:
        return {"distributed": "fsdp", "backend": "vllm", "colocated": True,
                "note": "FSDP (policy, reference and critic sharded), a colocated vLLM engine on every rank"}
    return {"distributed": "ddp", "backend": "hf", "colocated": False,
            "note": "vLLM is not installed here, so the colocated check (FSDP with a vLLM engine on every "
                    "rank) cannot run: the trainer refuses fsdp with the transformers engine over several "
                    "processes (it samples from the local, sharded module). Ran instead: ddp with the "
                    "transformers engine, every rank holding the whole policy"}


def for_gpus(profile: Profile, n: int) -> Profile:
    """The per-GPU sizes as a whole job's: batch and mini-batch sizes times the processes."""
    return replace(profile, prompts=profile.prompts * n, mini_batch_size=profile.mini_batch_size * n)


def launch_command(n: int, port: int | str, device: str, distributed: str, job_path: Path,
                   python: str = sys.executable) -> list[str]:
    """N rank processes of `python -m apo.tools.gpu_check_multi JOB`. On GPUs as the pipeline's
    training rule starts them (workflow/rules/train.smk: `accelerate launch` with the mode's
    config, one process per GPU, a port of the job's own); on the CPU with torchrun, as
    tests/test_fsdp.py does (accelerate's multi-GPU config wants devices)."""
    worker = ["apo.tools.gpu_check_multi", str(job_path)]
    if device == "cuda":
        return [python, "-m", "accelerate.commands.launch", "--config_file",
                str(ACCELERATE_CONFIGS / f"{distributed}.yaml"), "--num_processes", str(n),
                "--main_process_port", str(port), "--module", *worker]
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
            "--module", *worker]


def launch_env(device: str, environ=os.environ) -> dict:
    """The ranks' environment: unbuffered output; on the CPU no GPU, one thread per process."""
    env = {**environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- placement (pure)


def placement_problems(records: list[dict], device_type: str) -> list[str]:
    """What is wrong with where the ranks put their work: on GPUs every rank's trainer, policy,
    current CUDA device and engine (worker and weights) must be cuda:LOCAL_RANK, and no two
    ranks may share a GPU; on the CPU everything is on the CPU."""
    problems = []
    for r in records:
        want = f"cuda:{r['local_rank']}" if device_type == "cuda" else "cpu"
        for key in ("trainer", "policy", "current", "engine", "engine_weights"):
            if r.get(key) is None:
                problems.append(f"rank {r['rank']}: where its {key} lives is unknown")
            elif r[key] != want:
                problems.append(f"rank {r['rank']}: {key} on {r[key]}, expected {want} (LOCAL_RANK {r['local_rank']})")
    if device_type == "cuda":
        owners: dict[str, list[int]] = {}
        for r in records:
            for dev in {r.get("trainer"), r.get("engine"), r.get("engine_weights")} - {None}:
                owners.setdefault(dev, []).append(r["rank"])
        for dev, ranks in sorted(owners.items()):
            if len(ranks) > 1:
                problems.append(f"ranks {', '.join(map(str, sorted(ranks)))} share {dev}: one GPU per rank")
    return problems


# --------------------------------------------------------------------------- one rank (worker)


def _engine_placement(worker) -> tuple[str, str]:
    """Run inside vLLM's worker (collective_rpc): its device and where its weights are."""
    return str(worker.device), str(next(worker.get_model().parameters()).device)


def engine_placement(generator) -> tuple[str | None, str | None]:
    """(device, weights' device) of this process's engine."""
    if hasattr(generator, "llm"):  # vLLM: asked of its (in-process) worker
        (device, weights), = generator.llm.collective_rpc(_engine_placement)
        return device, weights
    device = str(next(generator.model.parameters()).device)  # transformers: the policy itself
    return device, device


def device_label(device) -> str:
    """"cuda:1" for a GPU (an index-less "cuda" stays so: it means the current device,
    whichever that is); "cpu" for the CPU, whatever index torch gives it."""
    import torch

    device = torch.device(device)
    return str(device) if device.type == "cuda" else device.type


def placement_record(t, local_rank: int) -> dict:
    import torch

    engine, engine_weights = engine_placement(t.generator)
    return {
        "rank": t.accelerator.process_index, "local_rank": local_rank,
        "trainer": device_label(t.accelerator.device), "policy": device_label(next(t.policy.parameters()).device),
        "current": f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu",
        "engine": device_label(engine), "engine_weights": device_label(engine_weights),
    }


class PhaseMemory:
    """Peaks of this rank's GPU memory by phase, read where the trainer hands over between
    them: the engine's `sleep` ends generation (its call returns after the rollout), its
    `sync_weights` starts after the update. CUDA's peak counter is reset at each boundary; the
    device's used memory (what `cudaMemGetInfo` sees: vLLM's pool, the CUDA context) is sampled
    there. Also records whether the engine was asleep through the update and awake after the
    sync. On the CPU only the process's peak resident memory is known."""

    def __init__(self, device):
        import torch

        self.device, self.cuda = device, device.type == "cuda"
        self.torch = torch
        self.peaks = {"generate": 0.0, "update": 0.0}
        self.used_max = 0.0
        self.events: list[dict] = []

    def _mark(self, phase: str | None) -> None:
        cuda = self.torch.cuda
        if not self.cuda:
            return
        if phase is not None:
            self.peaks[phase] = max(self.peaks[phase], cuda.max_memory_allocated(self.device) / 2**20)
        free, total = cuda.mem_get_info(self.device)
        self.used_max = max(self.used_max, (total - free) / 2**20)
        cuda.reset_peak_memory_stats(self.device)

    def watch(self, generator) -> None:
        sleep, sync = generator.sleep, generator.sync_weights

        def sleep_then_mark():
            self._mark("generate")  # the rollout's peak, engine awake
            sleep()
            self._mark(None)  # what the sleeping engine gave back
            self.events.append({"asleep_in_update": bool(getattr(generator, "asleep", False))})

        def mark_then_sync(model):
            self.events[-1]["asleep_at_sync"] = bool(getattr(generator, "asleep", False))
            self._mark("update")
            sync(model)
            self._mark("generate")  # the sync gathers weights while the engine is awake
            self.events[-1]["awake_after_sync"] = not getattr(generator, "asleep", False)

        generator.sleep, generator.sync_weights = sleep_then_mark, mark_then_sync

    def summary(self) -> dict:
        from apo.monitor import peak_memory_mb

        cuda = self.torch.cuda
        if not self.cuda:
            return {"peak_generate_gb": None, "peak_update_gb": None, "peak_allocated_gb": peak_memory_mb(self.device) / GB,
                    "peak_reserved_gb": None, "device_used_gb": None, "device_total_gb": None, "engine_events": self.events}
        total = cuda.get_device_properties(self.device).total_memory / 2**20
        return {"peak_generate_gb": self.peaks["generate"] / GB, "peak_update_gb": self.peaks["update"] / GB,
                "peak_allocated_gb": max(self.peaks.values()) / GB,
                "peak_reserved_gb": cuda.max_memory_reserved(self.device) / 2**30,
                "device_used_gb": self.used_max / GB, "device_total_gb": total / GB, "engine_events": self.events}


def plan_estimate(config: dict, method: str, model_dir: str, prompt_tokens: int, gpu_memory_gb) -> dict:
    """The memory plan's per-GPU estimate (GiB) of this job: the config's resources.train, with
    this GPU's size (so that the engine's share is counted) and the check's longest prompt as
    prompt.max_prompt_tokens (the plan's sequence length is prompt + response)."""
    from apo import memory

    config = {**config, "prompt": {**config["prompt"], "max_prompt_tokens": prompt_tokens},
              "resources": {**config["resources"], "train": {**config["resources"]["train"],
                                                             "gpu_memory_gb": gpu_memory_gb}}}
    e = memory.estimate(memory.model_shape(config, model_dir), memory.job_from_config(config, method, method))
    return {"plan_generate_gb": e.generation_peak() / memory.GIB, "plan_update_gb": e.update_peak() / memory.GIB,
            "plan_peak_gb": e.peak() / memory.GIB, "plan_phase": e.peak_phase}


def gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def measure_ranks(job: dict) -> dict | None:
    """This rank's part of the check; rank 0 returns every rank's rows, the others None."""
    import torch

    from apo import train as T
    from apo.reward import Grader

    T.claim_local_device()  # before the peak counters touch CUDA: else every rank opens GPU 0
    local = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local) if job["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    t = T.setup(job["settings"], job["model"], job["prompts"], job["vstar"], Path(job["out_dir"]),
                job["generation"], job["gradient_checkpointing"], distributed=job["distributed"])
    setup_s = time.perf_counter() - clock
    records = gather(placement_record(t, local))
    problems = placement_problems(records, device.type)
    if problems:
        raise SystemExit("gpu-check: ranks misplaced: " + "; ".join(problems))
    memory = PhaseMemory(device)
    memory.watch(t.generator)
    steps = []
    with Grader.from_settings(job["settings"], job["grading"]["workers"]) as grader:
        for step in range(job["settings"]["steps"]):
            row = T.train_step(t, grader, step)
            steps.append({k: row[k] for k in ("time_step_s", "time_generate_s", "time_update_s", "time_sync_s",
                                               "response_length")})
    summary = memory.summary()
    # sleep mode exists on GPUs only (apo.generation.VLLMGenerator)
    expect_sleep = device.type == "cuda" and job["settings"]["backend"] == "vllm" and job["generation"]["vllm"]["sleep"]
    cycle, cycle_problems = engine_cycle(summary["engine_events"], expect_sleep)
    gpu_gb = summary["device_total_gb"]
    mine = {**records[t.accelerator.process_index], **summary, "engine_cycle": cycle, "problems": cycle_problems,
            "setup_s": setup_s, "steps": steps,
            **plan_estimate(job["config"], job["method"], job["model"], job["max_prompt_tokens"], gpu_gb),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}
    rows = gather(mine)
    return rows if t.accelerator.process_index == 0 else None


def rank_main(job_path: str) -> None:
    from apo.tools.gpu_check import quiet_progress_bars

    quiet_progress_bars()
    job = json.loads(Path(job_path).read_text())
    rows = measure_ranks(job)
    if rows is not None:
        Path(job["result"]).write_text(json.dumps(rows, indent=1))


# --------------------------------------------------------------------------- report (pure)


def _gb(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def engine_cycle(events: list[dict], expect_sleep: bool) -> tuple[str, list[str]]:
    """What the engine did around each step's update ("slept, woke" when it slept through the
    update and was awake after the weight sync) and the problems: an engine configured to sleep
    that stayed awake, or one not awake after the sync."""
    if not events:
        return "–", ["no training step reached the engine's sleep"]
    problems = []
    for i, e in enumerate(events, 1):
        if expect_sleep and not e.get("asleep_at_sync"):
            problems.append(f"step {i}: the engine was awake during the update (sleep mode is on)")
        if not e.get("awake_after_sync"):
            problems.append(f"step {i}: the engine was not awake after the weight sync")
    slept = all(e.get("asleep_at_sync") for e in events)
    label = "slept, woke" if slept else "awake throughout" if not expect_sleep else "did not sleep"
    return f"{label} ({len(events)} steps)", problems


def rank_table(rows: list[dict]) -> str:
    """One row per rank: where it ran, its measured peaks and the plan's estimate (GiB)."""
    head = ["rank", "trainer", "engine", "engine weights", "engine cycle", "peak generate (GB)", "peak update (GB)",
            "peak allocated (GB)", "peak reserved (GB)", "device used (GB)", "plan generate (GB)",
            "plan update (GB)", "plan peak (GB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in sorted(rows, key=lambda r: r["rank"]):
        cells = [str(r["rank"]), r["trainer"], r["engine"], r["engine_weights"], r["engine_cycle"],
                 _gb(r["peak_generate_gb"]), _gb(r["peak_update_gb"]), _gb(r["peak_allocated_gb"]),
                 _gb(r["peak_reserved_gb"]), _gb(r["device_used_gb"]), _gb(r["plan_generate_gb"]),
                 _gb(r["plan_update_gb"]), f"{_gb(r['plan_peak_gb'])} ({r['plan_phase']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(report: dict) -> str:
    """The Markdown file: what ran, one table per method, what the columns are."""
    p, r = report["profile"], report["run"]
    lines = [f"# GPU check, {r['gpus']} processes ({p['name']}): {r['device_name']}, {r['date']}", "",
             f"{r['mode']['note']}. Random-weight Qwen2 model of {report['inputs']['parameters']:,} parameters; "
             f"{p['prompts']} prompts per step over all ranks ({p['prompts'] // r['gpus']} per rank), responses of "
             f"{p['response_tokens']} tokens at most, {p['steps']} steps per method; settings of `{r['config']}` "
             f"otherwise; launched with `{r['launcher']}`.", ""]
    for method in report["order"]:
        result = report["methods"][method]
        lines.append(f"## {method}: {result['status']}")
        if result.get("ranks"):
            lines += ["", rank_table(result["ranks"])]
        lines.append("")
    lines.append(
        "Peak generate / update: CUDA's allocator peak of the rank in the rollout (engine awake) and in "
        "scoring and the update (engine asleep), over both steps; peak reserved: the allocator's reserved "
        "peak; device used: total minus free memory of the GPU (vLLM's pool and the CUDA context "
        "included) sampled at the phase ends. Plan: apo.memory's estimate of the same job per GPU "
        "(src/apo/memory.py). On the CPU the allocated column is the process's peak resident memory.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the check (driver)


def run_ranks(job: dict, workdir: Path, n: int, timeout_s: float) -> dict:
    """One method over N rank processes (a process group of their own, stopped whole when
    the budget runs out); the ranks' rows, or a status saying why there are none."""
    job_path = workdir / f"job-{job['method']}.json"
    job_path.write_text(json.dumps(job))
    cmd = launch_command(n, free_port(), job["device"], job["distributed"], job_path)
    proc = subprocess.Popen(cmd, env=launch_env(job["device"]), preexec_fn=os.setpgrp)
    clock = time.perf_counter()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s (the check's time budget)"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - clock
    if code != 0 or not Path(job["result"]).exists():
        return {"status": f"failed (exit code {code}; the ranks' output is above)", "wall_s": wall}
    ranks = json.loads(Path(job["result"]).read_text())
    problems = [f"rank {r['rank']}: {p}" for r in ranks for p in r["problems"]]
    status = "ok" if not problems else "failed: " + "; ".join(problems)
    return {"status": status, "wall_s": wall, "ranks": ranks}


def make_job(method: str, profile: Profile, config: dict, inputs: dict, workdir: Path, mode: dict,
             checkpointing: bool) -> dict:
    from apo.tools.gpu_check import method_settings
    from apo.settings import runtime_knobs

    generation = runtime_knobs(config)["generation"]
    if profile.device == "cpu":
        generation = {**generation, "vllm": {**generation["vllm"], **CPU_ENGINE}}
    return {
        "method": method, "device": profile.device, "distributed": mode["distributed"],
        "settings": method_settings(config, method), "config": config, "model": inputs["model"],
        "prompts": inputs["prompts"], "vstar": inputs["vstar"] if methods.get(method).reads_vstar else None,
        "max_prompt_tokens": inputs["prompt_tokens_max"], "out_dir": str(workdir / f"run-{method}"),
        "generation": generation,
        "grading": {"workers": config["grading"]["workers"]},  # the runtime knob; the rest is in settings
        "gradient_checkpointing": checkpointing, "result": str(workdir / f"result-{method}.json"),
    }


def build_inputs_elsewhere(profile: Profile, config: dict, workdir: Path) -> dict:
    """apo.tools.gpu_check.build_inputs, on a GPU in a child process: the CUDA context the model
    build opens is then gone before the ranks measure theirs (else GPU 0 holds it); and the
    longest prompt in tokens."""
    import multiprocessing

    import pandas as pd
    from transformers import AutoTokenizer

    from apo.tools.gpu_check import build_inputs

    if profile.device == "cpu":
        inputs = build_inputs(profile, config, workdir)
    else:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            inputs = pool.apply(build_inputs, (profile, config, workdir))

    tok = AutoTokenizer.from_pretrained(inputs["model"])
    prompts = pd.read_parquet(inputs["prompts"])["prompt"]
    inputs["prompt_tokens_max"] = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    return inputs


def check(args) -> int:
    """Plan, build the inputs, run each method over N ranks within the budget; write
    gpu-check-multi.json and .md after each. Returns the exit code."""
    import torch

    from apo.config import vllm_available
    from apo.tools.gpu_check import PAPER_CONFIG, check_config, out_dir, preflight, quiet_progress_bars, shown_path

    start = time.perf_counter()
    base = FSDP_TINY if args.tiny else FSDP
    if args.device:
        base = replace(base, device=args.device)
    preflight(base)
    n = resolve_gpus(args.gpus, torch.cuda.device_count() if base.device == "cuda" else 0, base.device)
    changes = {k: v for k, v in {"prompts": args.prompts, "steps": args.steps, "response_tokens": args.response_tokens,
                                  "budget_s": args.budget_s}.items() if v is not None}
    if args.prompts is not None:
        changes["mini_batch_size"] = max(1, args.prompts // 2)
    profile = for_gpus(replace(base, **changes), n)
    names = [m.strip() for m in (args.methods or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    for name in names:
        methods.get(name)
    mode = colocated_mode(vllm_available())
    print(f"gpu-check: {n} processes: {mode['note']}", flush=True)
    config = check_config(profile, Path(args.config or PAPER_CONFIG), backend=mode["backend"],
                          train_resources={"gpu": n, "distributed": mode["distributed"]})
    out = out_dir(args)
    quiet_progress_bars()
    launcher = " ".join(launch_command(n, "PORT", profile.device, mode["distributed"], Path("JOB"), "python"))
    with tempfile.TemporaryDirectory(prefix="apo-gpu-check-multi-") as tmp:
        workdir = Path(tmp)
        inputs = build_inputs_elsewhere(profile, config, workdir)
        print(f"gpu-check: {inputs['parameters']:,}-parameter model built in {inputs['build_s']:.1f} s", flush=True)
        report = {"profile": asdict(profile), "order": [], "methods": {},
                  "inputs": {k: inputs[k] for k in ("parameters", "prompt_tokens_mean", "prompt_tokens_max", "build_s")},
                  "run": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpus": n, "mode": mode,
                          "config": shown_path(args.config or str(PAPER_CONFIG)), "launcher": launcher,
                          "device_name": "CPU" if profile.device == "cpu" else f"{n} CUDA devices",
                          "torch": torch.__version__}}
        for method in names:
            remaining = profile.budget_s - (time.perf_counter() - start)
            job = make_job(method, profile, config, inputs, workdir, mode, args.gradient_checkpointing)
            row = (run_ranks(job, workdir, n, remaining) if remaining >= 30
                   else {"status": "skipped (the check's time budget is spent)"})
            report["methods"][method], report["order"] = row, report["order"] + [method]
            if row.get("ranks"):
                report["run"]["device_name"] = row["ranks"][0]["device_name"]
            write_report(out, report)
            print(f"gpu-check: {method}: {row['status']}", flush=True)
    print(describe(report))
    print(f"gpu-check: wrote {out / 'gpu-check-multi.json'} and {out / 'gpu-check-multi.md'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    if not all(r["status"] == "ok" for r in report["methods"].values()):
        return 1
    return 0 if mode["colocated"] else 2  # 2: what could run ran, the colocated check did not


def write_report(out: Path, report: dict) -> None:
    from apo.io import write_json, write_text

    write_json(out / "gpu-check-multi.json", report)
    write_text(out / "gpu-check-multi.md", describe(report))


if __name__ == "__main__":
    rank_main(sys.argv[1])
