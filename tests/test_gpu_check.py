"""The GPU check (scripts/gpu-check.sh, apo.tools.gpu_check): its --tiny run on the CPU, the model
and tokenizer it builds, the settings it trains with, and how it turns steps into a table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from apo import methods
from apo.config import validate_config
from apo.tools import gpu_check as G

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Mia has 7 marbles. She finds 5 more. How many marbles does Mia have now? Think step by step.",
         "Leo has 3 coins. He loses 2. How many coins does Leo have now? Put the answer in \\boxed{}."]


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory):
    """scripts/gpu-check.sh --tiny, run once as CI runs it."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "APO_WHEELS": str(out / "no-wheels")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--tiny", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc, out


def test_tiny_check_trains_every_method_and_writes_one_table(tiny_check):
    proc, out = tiny_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["order"] == ["apo", "grpo", "rebel", "ppo"]
    rows = report["methods"]
    for method in report["order"]:
        row = rows[method]
        assert row["status"] == "ok"
        assert len(row["steps"]) == G.TINY.steps and row["timed_steps"] == G.TINY.steps - G.TINY.warmup
        assert row["step_s"] > 0 and row["phases_s"]["generate"] > 0 and row["phases_s"]["update"] > 0
        assert row["peak_allocated_gb"] > 0 and row["peak_reserved_gb"] is None  # CPU: no reserved pool
        # the recipe: float32 master weights and AdamW state, bf16 autocast
        assert (row["policy_dtype"], row["adam_state_dtypes"], row["mixed_precision"]) == ("float32", ["float32"], "bf16")
        assert row["response_length"] <= G.TINY.response_tokens
    assert rows["apo"]["step_s_vs_apo"] == 1.0
    assert rows["grpo"]["step_s_vs_apo"] == pytest.approx(rows["grpo"]["step_s"] / rows["apo"]["step_s"])
    assert rows["grpo"]["responses_per_step"] == 8 * rows["apo"]["responses_per_step"] == 8 * G.TINY.prompts
    assert rows["rebel"]["responses_per_step"] == 2 * G.TINY.prompts
    # only the methods with an importance ratio score pi_old; only PPO has a critic
    assert rows["apo"]["phases_s"]["old_logprobs"] < rows["grpo"]["phases_s"]["old_logprobs"]
    assert rows["grpo"]["phases_s"]["values"] < rows["ppo"]["phases_s"]["values"]
    table = (out / "gpu-check.md").read_text()
    for name in ("A*-PO", "GRPO", "REBEL", "PPO"):
        assert f"| {name} | " in table
    assert f"{rows['grpo']['step_s']:.2f}" in table and f"| A*-PO | {G.TINY.prompts} |" in table
    assert "| GRPO |" in proc.stdout  # the table is printed too


def test_tokenizer_decodes_every_id_and_keeps_prompts_intact():
    tok = G.make_tokenizer(TEXTS, vocab_size=3000, bpe_vocab=300)
    assert len(tok) == 3000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    pieces = [tok.decode([i]) for i in range(len(tok))]
    assert all(isinstance(p, str) for p in pieces)
    assert pieces[-1].strip().isalpha()  # filler tokens decode to plain words
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == TEXTS[1] and max(ids) < 300  # prompts use the learnt tokens only
    chat = tok.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_full_size_tokenizer_and_model_have_qwen25_1_5b_shape():
    tok = G.make_tokenizer(TEXTS, vocab_size=G.QWEN25_1_5B.vocab_size, bpe_vocab=400)
    assert len(tok) == 151_936
    assert len(tok.decode(list(range(len(tok))))) > 151_936  # every id decodes to something
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):  # the architecture without allocating 6 GB
        model = Qwen2ForCausalLM(G.model_config(G.QWEN25_1_5B, tok))
    assert sum(p.numel() for p in model.parameters()) == G.QWEN25_1_5B_PARAMETERS
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (1536, 28, 12, 2, 8960, 151_936)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings >= 1024 + G.FULL.response_tokens


def test_check_trains_with_the_paper_settings_at_the_check_sizes():
    paper = validate_config(yaml.safe_load(G.PAPER_CONFIG.read_text()), base_dir=ROOT)["train"]
    config = G.check_config(G.FULL, G.PAPER_CONFIG)
    sizes = {"batch_size": 16, "mini_batch_size": 8, "micro_batch_size": 1, "max_new_tokens": 512, "steps": 3}
    for method in G.METHODS:
        s = G.method_settings(config, method)
        assert {k: s[k] for k in sizes} == sizes
        assert s["backend"] == "hf" and s["method"] == method
        # validation's response length defaults to the training length, which the check sets
        shared = [k for k in paper if k not in sizes and k not in ("checkpoint_every", "gradient_checkpointing",
                                                                 "validation", "measure_kl")
                  and k not in methods.method_only_keys()]
        assert {k: s[k] for k in shared} == {k: paper[k] for k in shared}
        # measure_kl only where the loss does not read the reference (tests/test_settings.py)
        assert ("measure_kl" in s) == (not methods.get(method).reads_reference(s))
        for k in methods.get(method).settings:
            assert s[k] == paper[k]
    assert G.method_settings(config, "grpo")["grpo"]["group_size"] == 8
    assert config["train"]["compute_dtype"] == "bfloat16"


def test_one_method_is_measured_with_the_recipe(tmp_path):
    """One A*-PO step of the worker in this process: every phase timed, float32 master weights."""
    profile = G.TINY
    config = G.check_config(profile, G.PAPER_CONFIG)
    inputs = G.build_inputs(profile, config, tmp_path)
    job = G.make_job("apo", profile, config, inputs, tmp_path, checkpointing=False)
    job["settings"] = {**job["settings"], "steps": 1}
    result = G.measure(job)
    timed_phases = [k for k in result["steps"][0] if k.startswith("time_")]
    assert len(timed_phases) == 8 and result["policy_dtype"] == "float32"


def fake_result(step_times: list[float], peaks: list[float]) -> dict:
    steps = [{"time_step_s": t, "time_generate_s": t / 2, "time_update_s": t / 4, "peak_memory_mb": p,
              "peak_reserved_mb": 2 * p, "tokens": 100, "response_length": 8.0, "truncated": 1.0}
             for t, p in zip(step_times, peaks)]
    return {"steps": steps}


def test_medians_leave_out_the_warm_up_and_ratios_are_to_apo():
    apo = G.summarize(fake_result([9.0, 1.0, 3.0], [100, 200, 300]), warmup=1, responses=16)
    grpo = G.summarize(fake_result([50.0, 4.0, 8.0], [400, 500, 600]), warmup=1, responses=128)
    assert apo["step_s"] == 2.0 and grpo["step_s"] == 6.0  # medians of the timed steps
    assert apo["phases_s"]["generate"] == 1.0 and apo["phases_s"]["values"] == 0.0
    assert apo["peak_allocated_gb"] == 300 / 1024 and apo["peak_reserved_gb"] == 600 / 1024  # the last step's
    rows = {"apo": {"status": "ok", **apo}, "grpo": {"status": "ok", **grpo},
            "ppo": {"status": "timed out after 10 s (the check's time budget)"}}
    G.add_ratios(rows)
    assert rows["grpo"]["step_s_vs_apo"] == 3.0 and rows["grpo"]["peak_allocated_gb_vs_apo"] == 2.0
    table = G.markdown_table(rows, ["apo", "grpo", "ppo"])
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| GRPO | 128 | 3.00 |" in table and "| 6.00 | 3.00 | 0.59 | 2.00 | 1.17 | 2.00 |" in table
    assert "| PPO | timed out after 10 s" in table


def test_a_method_past_the_budget_is_skipped_or_stopped(tmp_path):
    job = {"method": "apo", "device": "cpu", "result": str(tmp_path / "result.json")}
    assert G.measure_one(job, G.TINY, tmp_path, remaining=5)["status"].startswith("skipped")
    stopped = G.run_method(job, tmp_path, timeout_s=0.5)  # killed while it imports
    assert stopped["status"].startswith("timed out after")
