import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "src" / "apo" / "config.schema.yaml"


@pytest.fixture
def demo_config() -> dict:
    """config/config.yaml as written (not yet validated)."""
    return copy.deepcopy(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))


TINY_DEMO = {
    "seed": 0,
    "task": {"num_train": 120, "num_test": 16, "num_valid": 12, "min_ops": 2, "max_ops": 2, "max_start": 9,
             "max_operand": 3, "slip_prob": 0.1, "reason_prob": 0.5},
    "model": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
              "num_heads": 1},
    "warm_start": {"steps": 10, "batch_size": 16, "lr": 3e-3},
}
SMOKE = ROOT / "tests" / "smoke_config.yaml"


def grade_one(gold: str, response: str, method: str = "math_verify", extract: str = "any") -> tuple[float, str, str]:
    """One response graded in this process, without a time bound: the function a grading
    worker runs for the method (`apo.reward.grade_function`), called directly."""
    from apo.grade_worker import resolve
    from apo.reward import grade_function

    return resolve(grade_function(method, extract))(gold, response)


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run snakemake on the repository's Snakefile with results under `workdir` (`env`: more
    environment variables for it and its jobs)."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A tiny demo stage directory (model/, train.jsonl, test.jsonl), built once."""
    from apo import demo

    out = tmp_path_factory.mktemp("demo")
    demo.build(TINY_DEMO, out, INSTRUCTION)
    return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke config run end to end once, locally; later tests read its results (the
    Slurm test compares its own run with this one)."""
    workdir = tmp_path_factory.mktemp("smoke")
    shutil.copytree(ROOT / "config", workdir / "config")
    (workdir / "tmp").mkdir()  # the jobs' temp directory, checked for leftovers
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(SMOKE), env={"TMPDIR": str(workdir / "tmp")})
    return workdir, proc


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process (a trainer runs once per process in the
    pipeline); tests that train twice with different mixed precision need it reset in between."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()


@pytest.fixture(scope="session")
def real_artefacts() -> dict:
    """The real Qwen2.5 tokenizer and SmolLM2-135M model directories (scripts/real_artefacts.py:
    built once per package versions into ~/.cache/apo-test-artefacts, then found there)."""
    import json

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "real_artefacts.py")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/real_artefacts.py failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)
