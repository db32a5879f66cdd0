"""Generation speed: the vLLM and transformers backends side by side on the demo's reference
sampling (same model, same prompts, same sampling settings), several alternating runs each.

    apo bench-generation [--config config/config.yaml] [--prompts 256] [--repeats 5]

Builds the demo model and the training prompts through Snakemake first if they are missing.
Prints tokens/s per run, the median per backend and the ratio of medians. Engine start-up is
timed separately: it is paid once per job, generation on every call.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml

from apo.config import validate_config
from apo.generation import SamplingSettings, VLLMSettings, make_generator
from apo.rollout import load_model
from apo.settings import Plan, model_path


def demo_inputs(config_path: str) -> tuple[str, str, dict]:
    config = validate_config(yaml.safe_load(Path(config_path).read_text()), source=config_path)
    plan = Plan(config)
    model, prompts = model_path(plan.model), f"{plan.train_data.dir}/prompts.parquet"
    if not Path(prompts).exists() or not Path(model).exists():
        targets = [prompts] + ([model] if plan.demo is not None else [])
        subprocess.run(["snakemake", "--cores", "all", *targets, "--configfile", config_path], check=True)
    return model, prompts, config


def run(config_path: str, n_prompts: int, repeats: int) -> dict:
    model_dir, prompts_path, config = demo_inputs(config_path)
    prompts = list(pd.read_parquet(prompts_path)["prompt"][:n_prompts])
    s = config["sample"]
    sampling = SamplingSettings(n=s["n"], temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=s["max_new_tokens"])
    model, tok = load_model(model_dir)
    longest = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)

    t = time.perf_counter()
    engines = {
        "hf": make_generator("hf", tok, model=model, batch_size=config["generation"]["batch_size"]),
        "vllm": make_generator("vllm", tok, model=model, model_path=model_dir, seed=0,
                               max_model_len=longest + sampling.max_new_tokens,
                               vllm=VLLMSettings.from_runtime(config["generation"])),
    }
    startup = time.perf_counter() - t
    print(f"model {model_dir}\n{len(prompts)} prompts x n={sampling.n}, T={sampling.temperature}, "
          f"top_p={sampling.top_p}, up to {sampling.max_new_tokens} new tokens; "
          f"hf batch {config['generation']['batch_size']} sequences\nvLLM engine start-up: {startup:.1f} s")
    for gen in engines.values():  # warm-up: first-call allocations and compilation
        gen.generate(prompts[:8], sampling, progress=False, seed=0)
    speed: dict[str, list[float]] = {"hf": [], "vllm": []}
    for r in range(repeats):
        for name, gen in engines.items():  # alternate, so that load on the machine hits both
            t = time.perf_counter()
            outs = gen.generate(prompts, sampling, progress=False, seed=r)
            dt = time.perf_counter() - t
            tokens = sum(len(c.token_ids) for cs in outs for c in cs)
            speed[name].append(tokens / dt)
            print(f"run {r + 1} {name:>4}: {tokens:7d} tokens in {dt:6.2f} s = {tokens / dt:8.0f} tokens/s")
    med = {k: statistics.median(v) for k, v in speed.items()}
    print(f"median tokens/s: hf {med['hf']:.0f}, vllm {med['vllm']:.0f}; "
          f"vllm / hf = {med['vllm'] / med['hf']:.2f}x ({repeats} runs each)")
    return {"median": med, "ratio": med["vllm"] / med["hf"], "runs": speed, "startup_s": startup}
