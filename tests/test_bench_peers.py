"""apo bench-peers: the runs, TRL's arguments, the batch conversion, the loss comparison and the
table (the timing itself needs TRL and minutes: it is a benchmark, run by hand); the loss
agreement with TRL's A2POTrainer on a tiny batch where TRL is installed (pip install -e .[bench])."""

import importlib.util
import json

import pytest
import torch

from apo.tools.bench_peers import (PEERS, agreement, agrees, label, markdown, project_batch, run_specs, summarize,
                                   trl_a2po_args, trl_grpo_args)

SETTINGS = {"lr": 3e-4, "batch_size": 64, "micro_batch_size": 32, "mini_batch_size": None, "warmup_steps": 10,
            "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 80, "compute_dtype": "float32",
            "lr_schedule": "constant_with_warmup", "weight_decay": 0.0, "max_grad_norm": 1.0, "beta2": 0.1,
            "seed": 0, "grpo": {"group_size": 8, "clip_eps": 0.2, "kl_coef": 0.0}}


def test_each_method_runs_trls_trainer_and_the_project_on_each_engine():
    specs = run_specs(["apo", "grpo"], ["vllm", "hf"])
    assert [label(s) for s in specs] == ["TRL A2POTrainer", "project apo (vllm)", "project apo (hf)",
                                         "TRL GRPOTrainer", "project grpo (vllm)", "project grpo (hf)"]
    with pytest.raises(SystemExit, match="'ppo' has no TRL peer"):
        run_specs(["ppo"], ["vllm"])


def test_trls_a2po_arguments_are_the_projects_settings():
    args = trl_a2po_args(SETTINGS, 12, "/tmp/x", 256)
    assert args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] == 64
    assert (args["beta2"], args["learning_rate"], args["warmup_steps"], args["max_completion_length"]) == (0.1, 3e-4, 10, 80)
    # TRL's defaults that would train something else: top-50 sampling, bf16, checkpointing, its prompt filter
    assert args["top_k"] == 0 and args["bf16"] is False and args["gradient_checkpointing"] is False
    assert args["filter_all_incorrect"] is False and args["lr_scheduler_type"] == "constant_with_warmup"
    assert args["max_steps"] == 12 and args["max_prompt_length"] == 256


def test_trls_grpo_batch_counts_completions():
    args = trl_grpo_args({**SETTINGS, "method": "grpo"}, 12, "/tmp/x", 256)
    assert args["per_device_train_batch_size"] == 32 * 8 and args["num_generations"] == 8
    assert args["gradient_accumulation_steps"] == 2 and args["loss_type"] == "dapo" and args["beta"] == 0.0


def test_several_optimizer_steps_per_batch_are_refused():
    with pytest.raises(ValueError, match="mini_batch_size must equal batch_size"):
        trl_a2po_args({**SETTINGS, "mini_batch_size": 32}, 12, "/tmp/x", 256)


def test_trls_left_padded_rows_become_the_projects_token_lists():
    # two rows: prompt [5, 6] left-padded by one pad (0), completion [7, 8] then masked tail
    ids = torch.tensor([[0, 5, 6, 7, 8, 0], [4, 5, 6, 9, 2, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]])
    prompts, responses = project_batch(ids, mask, 3)
    assert prompts == [[5, 6], [4, 5, 6]] and responses == [[7, 8], [9, 2]]


def test_agreement_measures_losses_and_gradient_directions():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    same = agreement(0.5, 0.5, g, [x.clone() for x in g])
    assert same["loss_abs_diff"] == 0 and same["grad_cosine"] == pytest.approx(1.0) and agrees(same)
    off = agreement(0.5, 0.6, g, [-x for x in g])
    assert off["loss_rel_diff"] == pytest.approx(0.1 / 0.6) and off["grad_cosine"] == pytest.approx(-1.0)
    assert not agrees(off)


def _result(wall, rss, update=None):
    return {"wall": wall, "cpu": [w * 2 for w in wall], "update": update, "peak_rss_mb": rss}


def test_the_table_gives_speed_and_memory_against_trls_trainer_of_the_same_method():
    specs = run_specs(["apo"], ["vllm"])
    runs = {"TRL A2POTrainer": [_result([9, 9, 0.4, 0.4, 0.4], 700)],
            "project apo (vllm)": [_result([9, 9, 0.2, 0.2, 0.2], 1400, update=[1, 1, 0.1, 0.1, 0.1])]}
    table = summarize(runs, specs)
    assert table.loc["project apo (vllm)", "speed_vs_trl"] == pytest.approx(2.0)  # the warm-up steps dropped
    assert table.loc["project apo (vllm)", "rss_vs_trl"] == pytest.approx(2.0)
    assert table.loc["project apo (vllm)", "cpu_s_per_step"] == pytest.approx(0.4)
    assert table.loc["TRL A2POTrainer", "speed_vs_trl"] == 1.0
    text = markdown(table)
    assert "| TRL A2POTrainer" in text and "2.000" in text and "method" not in text


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed (pip install -e .[bench])")
def test_the_a2po_losses_agree_on_a_tiny_batch(tiny_demo, tmp_path):
    """TRL's A2POTrainer and the project's apo_loss, on the batch TRL samples, with the same
    policy: the same loss and gradient (TRL installed only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.a2po import A2POConfig, A2POTrainer
    from datasets import Dataset

    from apo.tools.bench_peers import a2po_loss_agreement

    tok = AutoTokenizer.from_pretrained(tiny_demo / "model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_demo / "model", dtype=torch.float32)
    rows = [json.loads(line) for line in (tiny_demo / "train.jsonl").read_text().splitlines()[:6]]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                       add_generation_prompt=True) for r in rows]
    args = A2POConfig(**{**trl_a2po_args({**SETTINGS, "batch_size": 6, "micro_batch_size": 6, "max_new_tokens": 12},
                                         1, str(tmp_path), 128), "top_k": 0})
    trainer = A2POTrainer(model, lambda prompts, completions, **_: [float(len(c) % 2) for c in completions],
                          args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
    trainer._optimal_values = {p: 0.25 for p in prompts}
    # a policy moved away from the reference, so the log-ratio term is not zero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(0)
    result = a2po_loss_agreement(trainer, [{"prompt": p} for p in prompts], temperature=1.0)
    assert result["responses"] == 6
    assert agrees(result), result


def test_every_trainer_has_a_peer_name():
    assert set(PEERS) == {"apo", "grpo"}
