"""Fully sharded training (resources.train.distributed: fsdp) as a multi-GPU job runs it, on
CPU: two processes (gloo) started by torchrun, each with its own vLLM engine. The update
matches one process on the same global batch, the engines hold the gathered policy, and a PPO
run (policy and critic sharded) that lost its last checkpoint resumes to the same metrics and
final weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from apo import train as T
from apo.config import vllm_available
from fsdp_worker import update_once
from test_train import PPO, RUNTIME, SETTINGS, train_inputs  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]

WORKER = Path(__file__).with_name("fsdp_worker.py")
FSDP_SETTINGS = {**SETTINGS, "backend": "vllm", "steps": 3, "checkpoint_every": 2, "validate_every": 0}
GENERATION = {"batch_size": 64, "vllm": {"enforce_eager": True, "cpu_kvcache_gib": 1}}


def torchrun(args: dict, port: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(WORKER), json.dumps(args)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(T.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture
def untied_inputs(train_inputs, tmp_path):
    """The demo model with its LM head untied from the embedding (as in Qwen2.5-7B): the
    embedding and the head become FSDP units of their own, and the engine gets both."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(train_inputs[0])
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    path = tmp_path / "untied"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(train_inputs[0]).save_pretrained(path)
    return (str(path), *train_inputs[1:])


def test_sharded_update_matches_one_process_and_reaches_both_engines(untied_inputs, tmp_path):
    train_inputs = untied_inputs
    runtime = [GENERATION, RUNTIME[1]]
    # with gradient checkpointing (as the 3B and 7B paper configs train), against one process without
    torchrun({"mode": "update", "settings": FSDP_SETTINGS, "inputs": train_inputs, "out": str(tmp_path),
              "runtime": runtime, "gradient_checkpointing": True}, 29591)
    sharded = torch.load(tmp_path / "policy.pt")

    for rank in (0, 1):  # each engine samples from the gathered policy, no longer from the old one
        gaps = json.loads((tmp_path / f"engine_{rank}.json").read_text())
        assert gaps["updated"] < 1e-4 and gaps["before"] > 1e-3, gaps

    t = T.setup({**FSDP_SETTINGS, "backend": "hf"}, *train_inputs, tmp_path / "single", RUNTIME[0], False)
    assert t.policy.lm_head.weight is not t.policy.model.embed_tokens.weight  # untied, as loaded
    before = {k: v.clone() for k, v in t.policy.state_dict().items()}
    single = update_once(t)
    assert sharded.keys() == single.keys()
    moved = max(float((single[k] - before[k]).abs().max()) for k in sharded)
    assert moved > 1e-4, "the update did not move the weights: the comparison would be empty"
    for k in sharded:
        torch.testing.assert_close(sharded[k], single[k], rtol=1e-4, atol=1e-6, msg=k)


def test_sharded_training_checkpoints_shards_and_resumes(train_inputs, tmp_path):
    """PPO, so that both trained networks (policy and critic) are sharded, saved and restored."""
    out = tmp_path / "train"
    ppo = {**{k: v for k, v in FSDP_SETTINGS.items() if k != "beta2"}, **PPO, "method": "ppo"}
    args = {"mode": "train", "settings": ppo, "inputs": train_inputs, "out": str(out),
            "runtime": [GENERATION, RUNTIME[1]]}
    torchrun(args, 29593)
    ckpt = out / "checkpoints" / "step-000003"
    assert {p.name for p in ckpt.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    for net in ("policy", "critic"):
        assert {p.name for p in (ckpt / net).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert not list(ckpt.glob("optimizer*")) and not list(ckpt.glob("model*"))  # only in the shards
    saved = (out / "model" / "model.safetensors")
    assert saved.exists()
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert metrics["step"].tolist() == [1, 2, 3] and metrics["grad_norm"].gt(0).all()

    first = load_file(saved)
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # a plain checkpoint of the gathered policy
    assert model.config.architectures == ["Qwen2ForCausalLM"] and not model.lm_head.weight.is_meta

    # A rerun after losing the last checkpoint resumes from step 2 and ends where the first did.
    shutil.rmtree(ckpt), shutil.rmtree(out / "model"), (out / "metrics.parquet").unlink()
    proc = torchrun(args, 29595)
    assert "resumed from" in proc.stderr
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "metrics.parquet").filter(regex="^(?!time_|peak_)"),
        metrics.filter(regex="^(?!time_|peak_)"))
    again = load_file(saved)
    assert again.keys() == first.keys()
    for k in first:
        torch.testing.assert_close(again[k], first[k], msg=k)
