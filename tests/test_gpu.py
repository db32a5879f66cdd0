"""The trainer's CUDA paths, on a small random model: `pytest -m gpu` on a machine with a GPU
(scripts/gpu-check.sh --pytest runs them after the check); skipped where there is no CUDA.

bf16 autocast with float32 master weights, gradient checkpointing, PPO's critic beside the
policy, and the peak memory the trainer reports (CUDA's allocator peak, what the report and
the paper table read)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from apo import train as T
from apo.memory import ModelShape
from apo.reward import Grader
from apo.tools import gpu_check as G

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelShape(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=2048, vocab_size=2048, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 2-layer random Qwen2 model built on the GPU as the check builds its, 4 prompts, V*."""
    workdir = tmp_path_factory.mktemp("gpu")
    profile = replace(G.TINY, device="cuda", arch=SMALL, response_tokens=16)
    config = G.check_config(profile, G.PAPER_CONFIG)
    return profile, config, G.build_inputs(profile, config, workdir), workdir


def job_for(method: str, inputs, tmp_path, checkpointing: bool = False) -> dict:
    profile, config, inp, workdir = inputs
    return G.make_job(method, profile, config, inp, tmp_path, checkpointing)


def test_bf16_autocast_keeps_float32_master_weights(inputs, tmp_path):
    s = job_for("apo", inputs, tmp_path)["settings"]
    assert s["compute_dtype"] == "bfloat16"
    acc = T.make_accelerator(s, accum=1)
    policy, reference, _ = T.load_models(s, inputs[2]["model"], acc, gradient_checkpointing=False)
    policy, optimizer, _ = T.optimize(acc, policy, s, lr=1e-6)
    layer = acc.unwrap_model(policy).model.layers[0].mlp.down_proj
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    before = layer.weight.detach().clone()
    ids = torch.randint(0, SMALL.vocab_size, (2, 64), device=acc.device)
    policy.train()
    loss = policy(input_ids=ids).logits.float().logsumexp(-1).mean()  # prepare() wrapped forward in autocast
    acc.backward(loss)
    optimizer.step()
    assert seen == [torch.bfloat16]  # the matrix products ran in bf16
    assert {(p.dtype, p.device.type) for p in policy.parameters()} == {(torch.float32, "cuda")}
    state = [v for st in optimizer.state.values() for v in st.values() if v.dim() > 0]
    assert state and {v.dtype for v in state} == {torch.float32}
    assert next(reference.parameters()).dtype == getattr(torch, s["reference_dtype"])
    moved = layer.weight.detach() != before
    assert moved.float().mean() > 0.5  # an update of lr 1e-6 is kept in float32 ...
    lost = layer.weight.detach().bfloat16() == before.bfloat16()
    assert lost.float().mean() > 0.9  # ... where bf16 weights would have rounded almost all of it away


def backward_peak_mb(model_path: str, s: dict, checkpointing: bool) -> float:
    """Extra CUDA memory of one forward and backward pass of the decoder layers (8 x 1024
    tokens, train mode, bf16 autocast); the LM head is left out, being the same either way."""
    acc = T.make_accelerator(s, accum=1)
    policy, reference, _ = T.load_models(s, model_path, acc, gradient_checkpointing=checkpointing)
    policy = acc.prepare(policy)
    policy.train()
    ids = torch.randint(0, SMALL.vocab_size, (8, 1024), device=acc.device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with acc.autocast():
        hidden = acc.unwrap_model(policy).model(input_ids=ids).last_hidden_state
    hidden[:, -1].float().sum().backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del policy, reference, ids, hidden
    torch.cuda.empty_cache()
    return peak


def test_gradient_checkpointing_lowers_peak_memory_on_a_two_layer_model(inputs, tmp_path):
    s = job_for("apo", inputs, tmp_path)["settings"]
    plain = backward_peak_mb(inputs[2]["model"], s, checkpointing=False)
    recomputed = backward_peak_mb(inputs[2]["model"], s, checkpointing=True)
    # Without checkpointing both layers' activations are kept (about 360 MB here); with it only
    # the layer inputs, and one layer's activations while that layer's backward runs.
    assert recomputed < 0.8 * plain, (plain, recomputed)


def snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before: dict) -> bool:
    return any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_ppo_critic_and_policy_fit_on_the_gpu_and_both_step(inputs, tmp_path):
    job = job_for("ppo", inputs, tmp_path, checkpointing=True)
    t = T.setup(job["settings"], job["model"], job["prompts"], None, tmp_path, job["generation"], True)
    assert t.critic is not None
    for model in (t.policy, t.critic):
        assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.float32, "cuda")}
    policy_before, critic_before = snapshot(t.policy), snapshot(t.critic)
    with Grader.from_settings(job["settings"], job["grading"]["workers"]) as grader:
        rows = [T.train_step(t, grader, step) for step in range(2)]
    assert changed(t.policy, policy_before) and changed(t.critic, critic_before)
    for row in rows:
        assert torch.isfinite(torch.tensor([row["loss"], row["grad_norm"], row["kl"]])).all(), row
        assert row["optimizer_steps"] == 2 and row["time_values_s"] > 0


def test_trainer_reports_cudas_allocator_peak(inputs, tmp_path):
    job = job_for("apo", inputs, tmp_path)
    s = job["settings"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t = T.setup(s, job["model"], job["prompts"], job["vstar"], tmp_path / "steps", job["generation"], False)
    with Grader.from_settings(job["settings"], job["grading"]["workers"]) as grader:
        row = T.train_step(t, grader, 0)
    assert row["peak_memory_mb"] == pytest.approx(torch.cuda.max_memory_allocated() / 2**20)
    weights = sum(p.numel() * p.element_size() for p in t.policy.parameters())
    assert row["peak_memory_mb"] * 2**20 >= 3 * weights  # float32 weights and AdamW's two states at least
    del t
    # A whole run: the summary (what the report's memory column reads) is the steps' maximum.
    res = T.train(s, job["model"], job["prompts"], job["vstar"], tmp_path / "run", job["generation"], job["grading"])
    assert res["summary"]["peak_memory_mb"] == res["history"]["peak_memory_mb"].max()
    assert res["summary"]["peak_memory_mb"] <= torch.cuda.max_memory_allocated() / 2**20


def test_the_check_runs_on_the_gpu(tmp_path):
    """The check's own machinery (a process per method, the synchronizing phase clock, the
    reserved peak) at the tiny size on the GPU: a quick stand-in for the full run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "apo.tools.gpu_check", "--tiny", "--device", "cuda", "--methods",
                           "apo,ppo", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["order"] == ["apo", "ppo"]
    for row in report["methods"].values():
        assert row["status"] == "ok" and row["device_name"] == torch.cuda.get_device_name()
        assert row["peak_reserved_gb"] >= row["peak_allocated_gb"] > 0
