"""Generation speed: the vLLM and transformers backends side by side on the demo's reference
sampling (same model, same prompts, same sampling settings), several alternating runs each.

    apo bench-generation [--config config/config.yaml] [--prompts 256] [--repeats 5]
                         [--model DIR | --hidden-size H --num-layers L]

Builds the demo model and the training prompts through Snakemake first if they are missing.
`--hidden-size/--num-layers` time a larger random-weight model of the demo's architecture and
tokenizer instead (built into a temporary directory), to see how the ratio moves with size.
Prints tokens/s per run, the median per backend and the ratio of medians. Every run is a
fresh process (engine start, warm-up, one timed generation); engine start-up is timed
separately: it is paid once per job, generation on every call.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from apo.config import load_yaml, validate_config
from apo.generation import SamplingSettings, VLLMSettings, make_generator
from apo.sample import load_model
from apo.settings import Plan, model_path


def demo_inputs(config_path: str) -> tuple[str, str, dict]:
    config = validate_config(load_yaml(config_path), source=config_path)
    plan = Plan(config)
    model, prompts = model_path(plan.model), f"{plan.train_data.dir}/prompts.parquet"
    if not Path(prompts).exists() or not Path(model).exists():
        targets = [prompts] + ([model] if plan.demo is not None else [])
        subprocess.run(["snakemake", "--cores", "all", *targets, "--configfile", config_path], check=True)
    return model, prompts, config


def time_engine(backend: str, model_dir: str, prompts: list[str], sampling: SamplingSettings,
                generation: dict, seed: int) -> dict:
    """Start one engine, warm it up, time one generation: {startup_s, tokens, seconds}."""
    from transformers import AutoTokenizer

    # vLLM loads its own copy of the weights: the transformers model is for the hf engine only
    model, tok = load_model(model_dir) if backend == "hf" else (None, AutoTokenizer.from_pretrained(model_dir))
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    t = time.perf_counter()
    gen = make_generator(backend, tok, model=model, model_path=model_dir, seed=0,
                         batch_size=generation["batch_size"], max_model_len=longest + sampling.max_new_tokens,
                         vllm=VLLMSettings.from_runtime(generation))
    startup = time.perf_counter() - t
    gen.generate(prompts, sampling, progress=False, seed=seed + 1000)  # warm-up at full size: allocations, compilation
    t = time.perf_counter()
    outs = gen.generate(prompts, sampling, progress=False, seed=seed)
    seconds = time.perf_counter() - t
    return {"startup_s": startup, "tokens": sum(len(c.token_ids) for cs in outs for c in cs), "seconds": seconds}


def scaled_model(demo_model_dir: str, hidden_size: int, num_layers: int, out_dir: str) -> str:
    """A random-weight model like the demo's (same tokenizer and architecture, head_dim 32)
    with `hidden_size` and `num_layers`, saved to `out_dir`."""
    from transformers import AutoTokenizer

    from apo.demo import build_model

    if hidden_size % 32:
        raise ValueError(f"--hidden-size {hidden_size}: must be a multiple of 32 (vLLM's CPU head_dim)")
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    spec = {"hidden_size": hidden_size, "intermediate_size": 3 * hidden_size, "num_layers": num_layers,
            "num_heads": hidden_size // 32}
    model = build_model(tok, spec, seed=0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    print(f"random-weight model: hidden {hidden_size}, {num_layers} layers, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    return out_dir


def run(config_path: str, n_prompts: int, repeats: int, model: str | None = None,
        scale: tuple[int, int] | None = None) -> dict:
    """Alternate the engines over `repeats` rounds, each run in a fresh process: vLLM's CPU
    engine pins and spins OpenMP threads on every core, which slowed a transformers engine
    sharing its process (an earlier in-process version of this benchmark measured it)."""
    model_dir, prompts_path, config = demo_inputs(config_path)
    if scale is not None:
        with tempfile.TemporaryDirectory(prefix="apo-bench-") as tmp:
            return run(config_path, n_prompts, repeats, scaled_model(model_dir, *scale, tmp))
    model_dir = model or model_dir
    sampling = SamplingSettings.from_config(config["sample"])
    generation = {"batch_size": config["generation"]["batch_size"], "vllm": config["generation"]["vllm"]}
    print(f"model {model_dir}\n{n_prompts} prompts x n={sampling.n}, T={sampling.temperature}, "
          f"top_p={sampling.top_p}, up to {sampling.max_new_tokens} new tokens; hf batch "
          f"{generation['batch_size']} sequences; vLLM {generation['vllm']}; one process per run")
    speed: dict[str, list[float]] = {"hf": [], "vllm": []}
    startup: dict[str, list[float]] = {"hf": [], "vllm": []}
    for r in range(repeats):
        for name in speed:  # alternate, so that load on the machine hits both
            job = json.dumps({"backend": name, "model_dir": model_dir, "prompts_path": prompts_path,
                              "n_prompts": n_prompts, "sampling": dataclasses.asdict(sampling),
                              "generation": generation, "seed": r})
            proc = subprocess.run([sys.executable, "-m", "apo.tools.bench", job], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench run {r + 1} ({name}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            speed[name].append(res["tokens"] / res["seconds"])
            startup[name].append(res["startup_s"])
            print(f"run {r + 1} {name:>4}: {res['tokens']:7d} tokens in {res['seconds']:6.2f} s = "
                  f"{speed[name][-1]:8.0f} tokens/s (engine start {res['startup_s']:.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in speed.items()}
    print(f"median tokens/s: hf {med['hf']:.0f}, vllm {med['vllm']:.0f}; "
          f"vllm / hf = {med['vllm'] / med['hf']:.2f}x ({repeats} runs each); median vLLM engine "
          f"start {statistics.median(startup['vllm']):.1f} s")
    return {"median": med, "ratio": med["vllm"] / med["hf"], "runs": speed, "startup_s": startup}


if __name__ == "__main__":  # one timed run in this process (see `run`)
    job = json.loads(sys.argv[1])
    prompts = list(pd.read_parquet(job["prompts_path"])["prompt"][: job["n_prompts"]])
    print(json.dumps(time_engine(job["backend"], job["model_dir"], prompts, SamplingSettings(**job["sampling"]),
                                 job["generation"], job["seed"])))
