import copy
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"


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
    from test_pipeline import SMOKE, snakemake

    workdir = tmp_path_factory.mktemp("smoke")
    shutil.copytree(ROOT / "config", workdir / "config")
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(SMOKE))
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
