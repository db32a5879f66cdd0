"""Seconds per training step of each method, side by side, on a quiet machine.

    apo bench-steps RUN_DIR... [--config config/config.yaml] [--steps 20] [--rounds 2]

e.g. `apo bench-steps results/compare/stages/train_*`. A training job records its step times,
but they are comparable across methods only when nothing else ran on the machine meanwhile.
This re-times finished runs: each trains `--steps` steps from the start with exactly its run's
settings (the run's manifest, with `steps` and no validation) in a fresh process and a scratch
directory, one run after the other and in `--rounds` rounds, so that a disturbance hits every
method. The first run of each method is timed (e.g. seed 0 of a sweep's pick). Prints the
median seconds per step over the steps after the first two (engine warm-up) of every round,
responses per step, and the ratios to A*-PO. Runtime knobs (engine batch, grader workers) are
those of `--config`. Nothing under `results/` is written.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from apo.config import load_yaml, validate_config
from apo.methods import METHODS, REFERENCE
from apo.settings import runtime_knobs

WARMUP_STEPS = 2  # the first steps pay the engine's and the allocator's warm-up


def finished_runs(run_dirs: list[str]) -> dict[str, tuple[Path, dict]]:
    """method -> (directory, manifest) of the first finished training run given for it."""
    runs = {}
    for d in map(Path, run_dirs):
        manifest = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").exists() else None
        if manifest is None or manifest.get("kind") != "train" or not (d / "summary.json").exists():
            raise SystemExit(f"apo bench-steps: {d} is not a finished training run (manifest.json, summary.json)")
        runs.setdefault(manifest["settings"]["method"], (d.resolve(), manifest))
    return runs


def train_command(run_dir: Path, manifest: dict, steps: int, out: Path, runtime: dict) -> list[str]:
    """`apo train` with a run's settings, `steps` long, without validation, into `out`."""
    manifest = {**manifest, "settings": {**manifest["settings"], "steps": steps, "checkpoint_every": steps}}
    results = run_dir.parent.parent  # results/train/<hash>
    inputs = {role: f"{results}/{ref}" for role, ref in manifest["inputs"].items()}
    runtime = {**runtime, "tracking_uri": f"sqlite:///{out.parent}/mlflow.db"}
    cmd = [sys.executable, "-m", "apo.cli", "train", "--manifest", json.dumps(manifest), "--stage-dir", str(out),
           "--runtime", json.dumps(runtime), "--model", f"{inputs['model']}/model",
           "--prompts", f"{inputs['prompts']}/prompts.parquet"]
    if "vstar" in inputs:
        cmd += ["--vstar", f"{inputs['vstar']}/vstar.parquet"]
    return cmd


def time_run(run_dir: Path, manifest: dict, steps: int, runtime: dict) -> list[float]:
    """Seconds of each step after the warm-up, in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="apo-bench-steps-") as tmp:
        out = Path(tmp) / "train"
        proc = subprocess.run(train_command(run_dir, manifest, steps, out, runtime), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"timing {run_dir} failed:\n{proc.stderr[-3000:]}")
        metrics = pd.read_parquet(out / "metrics.parquet")
    return metrics["time_step_s"].tolist()[WARMUP_STEPS:]


def run(run_dirs: list[str], config_path: str, steps: int, rounds: int) -> pd.DataFrame:
    if steps <= WARMUP_STEPS:
        raise SystemExit(f"apo bench-steps: --steps must be more than the {WARMUP_STEPS} warm-up steps")
    runs = finished_runs(run_dirs)
    config = validate_config(load_yaml(config_path), source=config_path)
    runtime = runtime_knobs(config)
    times: dict[str, list[float]] = {m: [] for m in runs}
    for r in range(rounds):
        for method, (run_dir, manifest) in runs.items():
            times[method] += time_run(run_dir, manifest, steps, runtime)
            print(f"round {r + 1} {method:>5}: median {statistics.median(times[method]):.3f} s/step so far "
                  f"({run_dir.name}, lr {manifest['settings']['lr']:g})", flush=True)
    rows = []
    for method, (_, manifest) in runs.items():
        q25, med, q75 = statistics.quantiles(times[method], n=4, method="inclusive")
        rows.append({"method": method,
                     "responses_per_step": manifest["settings"]["batch_size"] * METHODS[method].samples(manifest["settings"]),
                     "median_s_per_step": med, "q25": q25, "q75": q75})
    table = pd.DataFrame(rows).set_index("method")
    if REFERENCE in table.index:
        table[f"vs_{REFERENCE}"] = table["median_s_per_step"] / table.loc[REFERENCE, "median_s_per_step"]
    print(f"\n{steps} steps per run ({WARMUP_STEPS} warm-up steps dropped), {rounds} rounds, a fresh process each:")
    print(table.to_markdown(floatfmt=".3f"))
    return table
