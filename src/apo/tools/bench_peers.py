"""The project's A*-PO and GRPO against TRL's A2POTrainer and GRPOTrainer, side by side.

    pip install -e .[bench]        # TRL, the peer (its requirements are already pinned)
    apo bench-peers [--config config/config.yaml] [--steps 12] [--rounds 3] [--engines vllm,hf]

Every run trains `--steps` steps of one trainer on the demo's model, training prompts and V*
table (the config's stages: build them first with `snakemake --cores all --until vstar`), in
a fresh process, the runs taking turns for `--rounds` rounds so that load on the machine hits
every one. Prints, per trainer, the median seconds per step (wall and CPU, the CPU of its
grading workers included) over the steps after the first two, the project's update phase,
the peak RSS of the process, the ratios to TRL's trainer of the same method, and whether the
two A*-PO losses and their gradients agree on one batch that TRL's trainer sampled.

TRL's defaults overridden, so that both sides train the same thing (`trl_a2po_args`,
`trl_grpo_args`; TRL 1.16):
- V*: TRL's Stage 1 samples its own V* with `beta1 * log(mean exp(r / beta1))`, which is NaN
  at the project's beta1 = 0 (the mean; a large beta1 approaches it); the project's V*
  table is handed to the trainer instead (`_optimal_values`), and `filter_all_incorrect` is
  off (the project's table is already filtered by `vstar.filter`).
- sampling: `top_k` None means transformers' default top-50; 0 samples from the full
  vocabulary as the project's engines do (GRPOConfig's default is already 0).
- `bf16` (TRL's default on) off and `gradient_checkpointing` (on) off: the demo trains in
  float32 without checkpointing.
- `beta2` (TRL 1e-3), learning rate, its schedule and warm-up, weight decay, gradient clip,
  completion and prompt length: the project's.
- batch: 64 prompts per optimizer step as `train.micro_batch_size` prompts per forward pass
  and gradient accumulation (GRPO: per-device batch in completions, prompts x group size).
- GRPO: `loss_type` dapo (the token mean over the mini-batch: `train.loss_agg` token_mean),
  `beta` = `train.grpo.kl_coef`, `epsilon` = `clip_eps`.
The project's side runs with `train.measure_kl` false: its GRPO at kl_coef 0 then skips the
reference's forward pass, which only its KL metric reads, as GRPOTrainer does at beta 0 (the
A*-PO loss reads the reference either way).
Not overridden, and so a difference: A2POTrainer's log-probs ignore the temperature (its
`_get_sequence_logps` calls `selective_log_softmax` without it), which only matters at
temperature != 1; TRL samples with `transformers.generate` (no vLLM in A2POTrainer), shuffles
prompts with its own sampler, and its optimizer is transformers' default (fused AdamW).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from apo.methods import METHODS

WARMUP_STEPS = 2  # the first steps pay the engine's and the allocator's warm-up
RESULT = "bench-peers result: "  # the worker's last word on stdout, which the engines' logs share
PEERS = {m.name: m.peer for m in METHODS.values() if m.peer}  # {method: TRL's trainer of it}
A2PO = "TRL A2POTrainer"  # the peer whose loss is also compared on one batch (`check_agreement`)


# --------------------------------------------------------------------------- what runs


def run_specs(methods: list[str], engines: list[str]) -> list[dict]:
    """The runs of one round: per method, TRL's trainer, then the project's on each engine."""
    specs = []
    for method in methods:
        if method not in PEERS:
            raise SystemExit(f"apo bench-peers: --methods: {method!r} has no TRL peer here (known: {', '.join(PEERS)})")
        specs.append({"impl": "trl", "method": method, "engine": "hf"})
        specs += [{"impl": "project", "method": method, "engine": e} for e in engines]
    return specs


def label(spec: dict) -> str:
    return PEERS[spec["method"]] if spec["impl"] == "trl" else f"project {spec['method']} ({spec['engine']})"


def demo_inputs(config_path: str, methods: list[str]) -> dict:
    """Model, prompts, V* table, each method's training settings and the runtime knobs of the
    config's plan; a clear error when the stages are not built."""
    from apo.config import validate_config
    from apo.settings import Plan, model_path, runtime_knobs

    raw = yaml.safe_load(Path(config_path).read_text())
    config = validate_config({**raw, "methods": methods, "seeds": [0]}, source=config_path)
    plan = Plan(config)
    files = {"model": model_path(plan.model), "prompts": f"{plan.train_data.dir}/prompts.parquet",
             "vstar": f"{plan.vstar.dir}/vstar.parquet"}
    missing = [p for p in files.values() if not Path(p).exists()]
    if missing:
        raise SystemExit(f"apo bench-peers: {', '.join(missing)} missing: build them first with "
                         f"`snakemake --cores all --until vstar --configfile {config_path}`")
    return {**files, "settings": {m: plan.trains[m].settings for m in methods}, "runtime": runtime_knobs(config),
            "max_prompt_tokens": config["prompt"]["max_prompt_tokens"]}


# --------------------------------------------------------------------------- TRL's arguments


def _common_args(s: dict, steps: int, out_dir: str, max_prompt_tokens: int) -> dict:
    if s["batch_size"] % s["micro_batch_size"]:
        raise ValueError(f"train.batch_size {s['batch_size']} is not a multiple of micro_batch_size {s['micro_batch_size']}")
    if (s.get("mini_batch_size") or s["batch_size"]) != s["batch_size"]:
        raise ValueError("apo bench-peers: train.mini_batch_size must equal batch_size (one optimizer step per batch)")
    return {
        "output_dir": out_dir, "report_to": "none", "save_strategy": "no", "logging_steps": steps,
        "use_cpu": True, "seed": s["seed"], "max_steps": steps,
        "gradient_accumulation_steps": s["batch_size"] // s["micro_batch_size"],
        "learning_rate": s["lr"], "lr_scheduler_type": s["lr_schedule"], "warmup_steps": s["warmup_steps"],
        "weight_decay": s["weight_decay"], "max_grad_norm": s["max_grad_norm"],
        "bf16": s["compute_dtype"] == "bfloat16", "gradient_checkpointing": False,
        "max_completion_length": s["max_new_tokens"], "temperature": s["temperature"], "top_p": s["top_p"],
        "top_k": 0,
    }


def trl_a2po_args(s: dict, steps: int, out_dir: str, max_prompt_tokens: int) -> dict:
    """A2POConfig keyword arguments for the project's A*-PO settings `s` (see the module doc)."""
    return {**_common_args(s, steps, out_dir, max_prompt_tokens), "per_device_train_batch_size": s["micro_batch_size"],
            "max_prompt_length": max_prompt_tokens, "beta2": s["beta2"], "filter_all_incorrect": False}


def trl_grpo_args(s: dict, steps: int, out_dir: str, max_prompt_tokens: int) -> dict:
    """GRPOConfig keyword arguments for the project's GRPO settings `s`."""
    g = s[s["method"]]  # the GRPO block of the method compared
    return {**_common_args(s, steps, out_dir, max_prompt_tokens),
            "per_device_train_batch_size": s["micro_batch_size"] * g["group_size"], "num_generations": g["group_size"],
            "beta": g["kl_coef"], "epsilon": g["clip_eps"], "loss_type": "dapo", "scale_rewards": "group"}


# --------------------------------------------------------------------------- one timed run


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the grading workers)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_project(job: dict) -> dict:
    """The project's trainer, step by step (`apo.train.train_step`), without validation,
    checkpoints or tracking."""
    from apo import train
    from apo.reward import Grader

    # TRL measures the KL only where its loss uses the reference: neither does the project here
    s = {**job["settings"], "backend": job["engine"], "steps": job["steps"], "measure_kl": False}
    runtime = job["runtime"]
    wall, cpu, update = [], [], []
    with tempfile.TemporaryDirectory(prefix="apo-bench-peers-") as tmp:
        vstar = job["vstar"] if METHODS[s["method"]].reads_vstar else None
        t = train.setup(s, job["model"], job["prompts"], vstar, Path(tmp),
                        runtime["generation"], gradient_checkpointing=False)
        with Grader.from_settings(s, runtime["grading"]["workers"]) as grader:
            for step in range(job["steps"]):
                w0, c0 = time.perf_counter(), cpu_seconds()
                row = train.train_step(t, grader, step)
                wall.append(time.perf_counter() - w0)
                cpu.append(cpu_seconds() - c0)
                update.append(row["time_update_s"])
    return {"wall": wall, "cpu": cpu, "update": update, "peak_rss_mb": peak_rss_mb(), "restored": getattr(
        t.generator, "restored", None)}


def trl_dataset(prompts_path: str, vstar_path: str | None):
    """The training prompts (joined to V* where given) as TRL reads them: `prompt` (the
    chat-formatted text, which TRL passes through unchanged) and `answer` for the reward."""
    from datasets import Dataset

    from apo.vstar import training_data

    data = training_data(prompts_path, vstar_path)
    return data, Dataset.from_pandas(data[["prompt", "answer"]].reset_index(drop=True))


def trl_trainer(job: dict, out_dir: str, grader):
    """TRL's trainer of `job["method"]` on the project's model, prompts, V* and reward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = job["settings"]
    data, dataset = trl_dataset(job["prompts"], job["vstar"] if METHODS[job["method"]].reads_vstar else None)

    def reward(prompts, completions, answer, **_):
        return list(grader.grade(list(answer), list(completions)).rewards)

    tok = AutoTokenizer.from_pretrained(job["model"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="float32")
    if PEERS[job["method"]] == A2PO:
        from trl.experimental.a2po import A2POConfig, A2POTrainer

        args = A2POConfig(**trl_a2po_args(s, job["steps"], out_dir, job["max_prompt_tokens"]))
        trainer = A2POTrainer(model, reward, args=args, train_dataset=dataset, processing_class=tok)
        trainer._optimal_values = dict(zip(data["prompt"], data["vstar"].astype(float)))  # the project's V*
        return trainer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**trl_grpo_args(s, job["steps"], out_dir, job["max_prompt_tokens"]))
    return GRPOTrainer(model, reward, args=args, train_dataset=dataset, processing_class=tok)


def time_trl(job: dict) -> dict:
    """TRL's trainer, timed from each step's start to its end by a callback."""
    from transformers import TrainerCallback

    from apo.reward import Grader

    s, runtime = job["settings"], job["runtime"]
    wall, cpu = [], []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.w0, self.c0 = time.perf_counter(), cpu_seconds()

        def on_step_end(self, args, state, control, **kwargs):
            wall.append(time.perf_counter() - self.w0)
            cpu.append(cpu_seconds() - self.c0)

    with tempfile.TemporaryDirectory(prefix="apo-bench-peers-") as tmp, \
            Grader.from_settings(s, runtime["grading"]["workers"]) as grader:
        trainer = trl_trainer(job, tmp, grader)
        trainer.add_callback(StepClock())
        trainer.train()
    return {"wall": wall, "cpu": cpu, "update": None, "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- the losses on one batch


def project_batch(input_ids, attention_mask, logits_to_keep: int) -> tuple[list[list[int]], list[list[int]]]:
    """TRL's left-padded prompt + completion rows as the project's unpadded prompt and response
    token lists: the prompt's tokens where its mask is 1, the completion's up to its mask's end
    (TRL masks everything after the first EOS)."""
    prompts, responses = [], []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        p_ids, p_mask = ids[:-logits_to_keep], mask[:-logits_to_keep]
        r_ids, r_mask = ids[-logits_to_keep:], mask[-logits_to_keep:]
        prompts.append([t for t, m in zip(p_ids, p_mask) if m])
        responses.append([t for t, m in zip(r_ids, r_mask) if m])
    return prompts, responses


def agreement(loss_a: float, loss_b: float, grads_a: list, grads_b: list) -> dict:
    """How far two losses and their gradients (lists of tensors, parameter by parameter) are
    apart: absolute and relative loss difference, gradient cosine and relative norm gap."""
    import torch

    a = torch.cat([g.flatten().double() for g in grads_a])
    b = torch.cat([g.flatten().double() for g in grads_b])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return {"loss_a": loss_a, "loss_b": loss_b, "loss_abs_diff": abs(loss_a - loss_b),
            "loss_rel_diff": abs(loss_a - loss_b) / max(abs(loss_a), abs(loss_b), 1e-30),
            "grad_cosine": cosine, "grad_norm_rel_diff": float((a.norm() - b.norm()).abs() / max(a.norm(), 1e-30))}


def agrees(result: dict, loss_tol: float = 1e-5, cosine_tol: float = 1e-6) -> bool:
    return result["loss_rel_diff"] <= loss_tol and 1 - result["grad_cosine"] <= cosine_tol


def a2po_loss_agreement(trainer, examples: list[dict], temperature: float) -> dict:
    """TRL's A2POTrainer loss and the project's `apo_loss` on the batch TRL samples for
    `examples` (its own `_prepare_inputs`), with their gradients on the same policy."""
    import torch

    from apo.losses import apo_loss
    from apo.scoring import token_logprobs

    model = trainer.model
    model.train()
    inputs = trainer._prepare_inputs(examples)
    model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    p_ids, r_ids = project_batch(inputs["input_ids"], inputs["attention_mask"], inputs["logits_to_keep"])
    pad = trainer.processing_class.pad_token_id
    logp, mask = token_logprobs(model, p_ids, r_ids, pad, temperature)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(trainer.ref_model, p_ids, r_ids, pad, temperature)
    loss, _ = apo_loss(logp, ref_logp, mask, inputs["rewards"], inputs["v_star"], trainer.args.beta2)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return {**agreement(trl_loss.item(), loss.item(), trl_grads, grads), "responses": len(r_ids)}


def check_agreement(job: dict) -> dict:
    """The A*-PO loss agreement on `job["batch"]` training prompts, seeded."""
    import torch

    from apo.reward import Grader

    s, runtime = job["settings"], job["runtime"]
    torch.manual_seed(s["seed"])
    with tempfile.TemporaryDirectory(prefix="apo-bench-peers-") as tmp, \
            Grader.from_settings(s, runtime["grading"]["workers"]) as grader:
        trainer = trl_trainer({**job, "steps": 1}, tmp, grader)
        examples = [trainer.train_dataset[i] for i in range(job["batch"])]
        return a2po_loss_agreement(trainer, examples, s["temperature"])


# --------------------------------------------------------------------------- the table


def summarize(runs: dict[str, list[dict]], specs: list[dict]) -> pd.DataFrame:
    """One row per trainer: medians over every round's steps after the warm-up, the largest
    peak RSS, and each ratio to TRL's trainer of the same method (speed: TRL's s/step over
    this one's, so > 1 is faster than TRL)."""
    rows = []
    for spec in specs:
        results = runs[label(spec)]
        wall = [w for r in results for w in r["wall"][WARMUP_STEPS:]]
        cpu = [c for r in results for c in r["cpu"][WARMUP_STEPS:]]
        update = [u for r in results if r["update"] for u in r["update"][WARMUP_STEPS:]]
        rows.append({"method": spec["method"], "trainer": label(spec), "s_per_step": statistics.median(wall),
                     "cpu_s_per_step": statistics.median(cpu),
                     "update_s": statistics.median(update) if update else math.nan,
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in results)})
    table = pd.DataFrame(rows)
    for method, group in table.groupby("method"):
        peer = group[group["trainer"] == PEERS[method]].iloc[0]
        table.loc[group.index, "speed_vs_trl"] = peer["s_per_step"] / group["s_per_step"]
        table.loc[group.index, "rss_vs_trl"] = group["peak_rss_mb"] / peer["peak_rss_mb"]
    return table.set_index("trainer")


def markdown(table: pd.DataFrame) -> str:
    """The table as the docs show it."""
    return table.drop(columns="method").to_markdown(floatfmt=".3f")


def worker_command(job: dict) -> list[str]:
    return [sys.executable, "-m", "apo.tools.bench_peers", json.dumps(job)]


def run_worker(job: dict) -> dict:
    proc = subprocess.run(worker_command(job), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench-peers run {job.get('impl')} {job.get('method')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def run(config_path: str, steps: int, rounds: int, methods: list[str], engines: list[str], batch: int) -> pd.DataFrame:
    if steps <= WARMUP_STEPS:
        raise SystemExit(f"apo bench-peers: --steps must be more than the {WARMUP_STEPS} warm-up steps")
    try:
        import trl
    except ImportError:
        raise SystemExit("apo bench-peers needs TRL: pip install -e .[bench]") from None
    inputs = demo_inputs(config_path, methods)
    specs = run_specs(methods, engines)
    base = {k: inputs[k] for k in ("model", "prompts", "vstar", "runtime", "max_prompt_tokens")}
    print(f"TRL {trl.__version__}; {steps} steps per run ({WARMUP_STEPS} warm-up steps dropped), {rounds} rounds, "
          f"a fresh process each; model {inputs['model']}", flush=True)
    runs: dict[str, list[dict]] = {label(s): [] for s in specs}
    for r in range(rounds):
        for spec in specs:
            job = {**base, **spec, "kind": "time", "steps": steps, "settings": inputs["settings"][spec["method"]]}
            res = run_worker(job)
            runs[label(spec)].append(res)
            print(f"round {r + 1} {label(spec):>22}: median {statistics.median(res['wall'][WARMUP_STEPS:]):.3f} s/step, "
                  f"cpu {statistics.median(res['cpu'][WARMUP_STEPS:]):.3f} s/step, peak RSS {res['peak_rss_mb']:.0f} MB",
                  flush=True)
    table = summarize(runs, specs)
    print(markdown(table))
    agreeing = [m for m in methods if PEERS.get(m) == A2PO]
    if agreeing:
        job = {**base, "kind": "agree", "method": agreeing[0], "batch": batch,
               "settings": inputs["settings"][agreeing[0]]}
        agree = run_worker(job)
        verdict = "agree" if agrees(agree) else "DISAGREE"
        print(f"A*-PO losses on one batch of {agree['responses']} TRL samples: TRL {agree['loss_a']:.8f}, project "
              f"{agree['loss_b']:.8f} (relative difference {agree['loss_rel_diff']:.1e}); gradient cosine "
              f"1 - {1 - agree['grad_cosine']:.1e}, norms {agree['grad_norm_rel_diff']:.1e} apart: {verdict}")
    return table


if __name__ == "__main__":  # one run in this process (see `run`)
    job = json.loads(sys.argv[1])
    if job["kind"] == "agree":
        out = check_agreement(job)
    else:
        out = time_project(job) if job["impl"] == "project" else time_trl(job)
    print(RESULT + json.dumps(out), flush=True)
    os._exit(0)  # the result is out: skip the engine's finalizers and the interpreter's teardown
