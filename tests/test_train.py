"""Trainer pieces: log-prob alignment, data order, collapse detection, run and resume."""

import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apo import methods
from apo import train as T
from apo.config import vllm_available
from apo.data import prepare

SETTINGS = {
    "method": "apo", "beta2": 0.1, "lr": 1e-3, "lr_schedule": "constant_with_warmup",
    "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "steps": 4, "batch_size": 8,
    "micro_batch_size": 4, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0,
    "checkpoint_every": 2, "keep_checkpoints": 2, "stop_on_collapse": False,
    "collapse": {"window": 20, "reward_ratio": 0.5, "length_ratio": 0.3}, "backend": "hf",
    "compute_dtype": "float32", "reference_dtype": "float32", "mini_batch_size": None, "entropy_coef": 0.0,
    "loss_agg": "token_mean", "require_eos": False, "measure_kl": True, "grading_timeout_s": 5, "grading_method": "math_verify", "grading_extract": "any",
    "validate_every": 2, "validation": {"k": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 16, "seed": 0},
}
RUNTIME = ({"batch_size": 64}, {"timeout_s": 5, "workers": 1})


def test_token_logprobs_match_full_sequence_log_softmax(tiny_demo):
    model = AutoModelForCausalLM.from_pretrained(tiny_demo / "model").eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    logp, mask = T.token_logprobs(model, prompts, responses, pad_id=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        full = model(input_ids=ids).logits[0].log_softmax(-1)
        expected = [full[len(p) - 1 + t, tok].item() for t, tok in enumerate(r)]
        assert logp[b, : len(r)].tolist() == pytest.approx(expected, abs=1e-5)


def test_batch_indices_cover_each_epoch_once_and_are_deterministic():
    seen = [i for step in range(5) for i in T.batch_indices(step, 4, 21, seed=3)]
    assert sorted(seen) == list(range(20)) or len(set(seen)) == 20  # 5 full batches of 21
    assert T.batch_indices(5, 4, 21, 3) != T.batch_indices(0, 4, 21, 3)  # a new epoch, new order
    assert T.batch_indices(7, 4, 21, 3) == T.batch_indices(7, 4, 21, 3)


def test_collapse_monitor():
    steady = T.CollapseMonitor(window=5)
    assert all(steady.update(0.3, 30) is None for _ in range(20))
    falling = T.CollapseMonitor(window=5)
    msgs = [falling.update(0.3 if i < 10 else 0.05, 30) for i in range(20)]
    reported = [m for m in msgs if m]
    assert len(reported) == 1 and "reward collapsed at step" in reported[0]  # reported once
    assert falling.message == reported[0]
    short = T.CollapseMonitor(window=5)
    msgs = [short.update(0.3, 30 if i < 10 else 2) for i in range(20)]
    assert any(m and "length collapsed" in m for m in msgs)


@pytest.fixture
def train_inputs(tiny_demo, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_demo / "model")
    spec = {"path": "demo", "split": "train", "prompt_field": "question", "answer_field": "answer",
            "id_field": "id", "answer_format": "plain", "limit": 16, "subset": None}
    prompts, _ = prepare(spec, {"instruction": "", "max_prompt_tokens": 256, "template": "chat"}, tok, str(tiny_demo))
    prompts.to_parquet(tmp_path / "prompts.parquet")
    valid, _ = prepare({**spec, "split": "valid", "limit": None}, {"instruction": "", "max_prompt_tokens": 256,
                                                                  "template": "chat"}, tok, str(tiny_demo))
    valid.to_parquet(tmp_path / "valid.parquet")
    pd.DataFrame({"id": prompts["id"], "vstar": 0.5}).to_parquet(tmp_path / "vstar.parquet")
    (tmp_path / "counts.json").write_text(json.dumps({"prompts": len(prompts), "dropped_by_filter": 0}))
    return str(tiny_demo / "model"), str(tmp_path / "prompts.parquet"), str(tmp_path / "vstar.parquet")


def test_train_writes_model_checkpoints_and_resumes(train_inputs, tmp_path):
    out = tmp_path / "run"
    res = T.train({**SETTINGS, "steps": 2}, *train_inputs, out, *RUNTIME)
    assert (out / "model" / "config.json").exists()
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000002"]
    assert res["history"]["step"].tolist() == [1, 2]
    # A rerun with more steps continues at step 3 and keeps the earlier history.
    res = T.train({**SETTINGS, "steps": 4}, *train_inputs, out, *RUNTIME)
    assert res["history"]["step"].tolist() == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    for col in ["reward", "loss", "kl", "response_length", "tokens", "time_generate_s",
                "time_ref_logprobs_s", "time_update_s", "time_sync_s", "peak_memory_mb"]:
        assert res["history"][col].notna().all(), col
    assert (res["history"]["tokens"] > 0).all() and res["summary"]["peak_memory_mb"] > 0


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(
    train_inputs, tmp_path, monkeypatch
):
    calls = {"n": 0}
    real = methods.METHODS["apo"]

    def nan_from_step_3(*args, **kwargs):  # 2 micro-batches per step
        calls["n"] += 1
        loss, stats = real.loss(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 4 else loss), stats

    monkeypatch.setitem(methods.METHODS, "apo", dataclasses.replace(real, loss=nan_from_step_3))
    with pytest.raises(T.NonFiniteLossError, match="non-finite loss .* at optimizer step 3; the last good checkpoint is .*step-000002"):
        T.train(SETTINGS, *train_inputs, tmp_path / "run", *RUNTIME)
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").exists()
    assert not (tmp_path / "run" / "model").exists()


PPO = {"ppo": {"clip_eps": 0.2, "value_clip": 0.5, "gamma": 1.0, "lam": 0.95, "kl_coef": 0.05, "critic_lr": 1e-3}}
VLLM = pytest.mark.skipif(not vllm_available(), reason="vLLM not installed")


@pytest.mark.parametrize("backend, method, validated", [("hf", "apo", False), ("hf", "apo", True),
                                                        pytest.param("vllm", "apo", True, marks=VLLM),
                                                        ("hf", "ppo", False)])
def test_resumed_run_equals_uninterrupted_run(backend, method, validated, train_inputs, tmp_path, monkeypatch):
    """Crash after the step-2 checkpoint, rerun: the final weights are bit-identical to a run
    that was never interrupted (CPU, same thread count: every op here is deterministic). With
    vLLM this also checks that the resumed engine gets the checkpoint's weights and that the
    per-step sampler seed reproduces the draws; with PPO that the critic and its optimizer
    come back too (the policy's updates depend on the critic's values); with validation, that
    the checkpoint keeps the validations made before the crash and the rerun adds the rest."""
    settings = {**SETTINGS, "steps": 4, "checkpoint_every": 2, "lr_schedule": "cosine", "warmup_steps": 1,
                "backend": backend}
    if method == "ppo":
        settings = {**{k: v for k, v in settings.items() if k != "beta2"}, **PPO, "method": "ppo"}
        train_inputs = (*train_inputs[:2], None)
    valid = {"validation_path": str(tmp_path / "valid.parquet")} if validated else {}
    straight_run = T.train(settings, *train_inputs, tmp_path / "straight", *RUNTIME, **valid)
    straight = straight_run["history"]

    real = T.batch_indices

    def crash_at_step_3(step, *args):
        if step == 2:  # 0-based: the third optimizer step
            raise KeyboardInterrupt("simulated kill")
        return real(step, *args)

    monkeypatch.setattr(T, "batch_indices", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(settings, *train_inputs, tmp_path / "resumed", *RUNTIME, **valid)
    assert not (tmp_path / "resumed" / "model").exists()  # nothing that looks finished
    monkeypatch.setattr(T, "batch_indices", real)
    res = T.train(settings, *train_inputs, tmp_path / "resumed", *RUNTIME, **valid)
    assert res["history"]["step"].tolist() == [1, 2, 3, 4]
    same = ["reward", "response_length", "loss", "tokens"]  # the same draws, the same updates
    pd.testing.assert_frame_equal(res["history"][same], straight[same])
    assert res["validation"]["step"].tolist() == ([0, 2, 4] if validated else [])
    measured = ["step", "accuracy", "response_length", "truncated"]
    pd.testing.assert_frame_equal(res["validation"][measured], straight_run["validation"][measured])

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method, extra", [("grpo", {"grpo": {"group_size": 4, "clip_eps": 0.2, "kl_coef": 0.01}}),
                                           ("rebel", {"rebel": {"eta": 0.01}}), ("ppo", PPO)])
def test_baselines_train_without_vstar(method, extra, train_inputs, tmp_path):
    model, prompts, _ = train_inputs
    settings = {k: v for k, v in SETTINGS.items() if k != "beta2"}
    res = T.train({**settings, **extra, "method": method, "steps": 2}, model, prompts, None, tmp_path / method, *RUNTIME)
    h = res["history"]
    n = methods.get(method).samples({**settings, **extra, "method": method})
    assert n == {"grpo": 4, "rebel": 2, "ppo": 1}[method]
    assert h["step"].tolist() == [1, 2] and h["loss"].notna().all()
    assert (tmp_path / method / "model" / "config.json").exists()
    if method == "ppo":  # the critic's own figures, and its pass timed apart from the update
        assert h["value_loss"].notna().all() and (h["time_values_s"] > 0).all()


def test_token_values_read_the_state_before_each_response_token(tiny_demo):
    """V(x, y_<t) sits at the position that predicts y_t, as the log-probs do."""
    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(tiny_demo / "model", num_labels=1).eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    values, mask = T.token_values(critic, prompts, responses, pad_id=0)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for b, (p, r) in enumerate(zip(prompts, responses)):
        full = critic(input_ids=torch.tensor([p + r])).logits[0, :, 0]
        assert values[b, : len(r)].tolist() == pytest.approx(full[len(p) - 1 : len(p) - 1 + len(r)].tolist(), abs=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights(train_inputs, tmp_path):
    """train.compute_dtype bfloat16 with gradient checkpointing: at lr 1e-6 one optimizer step
    moves almost every weight (bf16 weights would round nearly all such updates away), the
    checkpoint holds float32 master weights, the log-ratio to a float32 reference scored under
    the same autocast is exactly 0 before the first update, and the saved model is bf16."""
    from safetensors.torch import load_file

    settings = {**SETTINGS, "compute_dtype": "bfloat16", "lr": 1e-6, "steps": 1, "checkpoint_every": 1}
    res = T.train(settings, *train_inputs, tmp_path / "bf16", *RUNTIME, gradient_checkpointing=True)
    assert res["history"]["kl"].tolist() == [0.0]
    assert res["summary"]["compute_dtype"] == "bfloat16" and res["summary"]["gradient_checkpointing"] is True
    before = AutoModelForCausalLM.from_pretrained(train_inputs[0], dtype=torch.float32).state_dict()
    after = load_file(tmp_path / "bf16" / "checkpoints" / "step-000001" / "model.safetensors")
    assert {v.dtype for v in after.values()} == {torch.float32}
    changed = sum(int((after[k] != before[k]).sum()) for k in after)
    total = sum(after[k].numel() for k in after)
    assert changed / total >= 0.9, f"only {changed / total:.1%} of the weights moved"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "model", dtype="auto")
    assert saved.dtype == torch.bfloat16


def test_old_dtype_key_is_rejected():
    """Training in bf16 weights cannot be configured by accident: the old key is unknown."""
    from apo.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="unknown config key 'train.dtype'"):
        validate_config({"experiment": "x", "model": "demo", "data": {
            "train": {"path": "demo", "split": "train", "prompt_field": "q", "answer_field": "a"},
            "benchmarks": [{"name": "b", "path": "demo", "split": "test", "prompt_field": "q", "answer_field": "a"}]},
            "train": {"dtype": "bfloat16"}})


class _FakeGrader:
    """Rewards by position instead of by answer: every response right (`pattern` [1.0]), or
    alternating right and wrong ([1.0, 0.0]) so that every GRPO group has an advantage."""

    pattern = [1.0]

    @classmethod
    def from_settings(cls, settings, workers):  # the real one's settings, unused
        return cls()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def grade(self, golds, responses):
        from apo.reward import Grades

        rewards = [self.pattern[i % len(self.pattern)] for i in range(len(responses))]
        return Grades(rewards, ["ok"] * len(responses), [""] * len(responses))


class _Alternating(_FakeGrader):
    pattern = [1.0, 0.0]


GRPO = {"grpo": {"group_size": 4, "clip_eps": 0.01, "kl_coef": 0.0}}


def _grpo_settings(**kw):
    return {**{k: v for k, v in SETTINGS.items() if k != "beta2"}, **GRPO, "method": "grpo", "lr": 1e-2, **kw}


def test_mini_batches_take_several_optimizer_steps_with_live_ratios(train_inputs, tmp_path, monkeypatch):
    """train.mini_batch_size: batch 8 / mini-batch 4 = two optimizer steps per generation step;
    pi_old is scored before the first, so GRPO's ratio and clip act on the second. With one
    mini-batch the ratio is exactly 1 and nothing is clipped."""
    monkeypatch.setattr(T, "Grader", _Alternating)
    model, prompts, _ = train_inputs
    one = T.train(_grpo_settings(steps=1), model, prompts, None, tmp_path / "one", *RUNTIME)
    two = T.train(_grpo_settings(steps=1, mini_batch_size=4), model, prompts, None, tmp_path / "two", *RUNTIME)
    assert one["summary"]["optimizer_steps"] == 1 and two["summary"]["optimizer_steps"] == 2
    assert one["history"]["ratio_dev"].iloc[0] == 0 and one["history"]["clip_frac"].iloc[0] == 0
    assert two["history"]["ratio_dev"].iloc[0] > 0 and two["history"]["clip_frac"].iloc[0] > 0
    assert two["history"]["time_old_logprobs_s"].iloc[0] > 0


def test_only_methods_with_a_ratio_score_pi_old(train_inputs, tmp_path, monkeypatch):
    scored = []
    real = T.score_batch

    def spy(fn, model, *args):
        scored.append("reference" if model is getattr(spy, "reference", None) else "other")
        return real(fn, model, *args)

    real_setup = T.setup

    def setup(*args, **kwargs):
        t = real_setup(*args, **kwargs)
        spy.reference = t.reference
        return t

    monkeypatch.setattr(T, "score_batch", spy)
    monkeypatch.setattr(T, "setup", setup)
    T.train({**SETTINGS, "steps": 1, "mini_batch_size": 4}, *train_inputs, tmp_path / "apo", *RUNTIME)
    assert scored == ["reference"]  # A*-PO regresses on pi_ref only
    scored.clear()
    model, prompts, _ = train_inputs
    T.train(_grpo_settings(steps=1, mini_batch_size=4), model, prompts, None, tmp_path / "grpo", *RUNTIME)
    assert scored == ["reference", "other"]


def _count_reference_scorings(monkeypatch) -> list:
    """Records each `score_batch` call on the reference model during `T.train`."""
    calls, real, real_setup = [], T.score_batch, T.setup

    def setup(*args, **kwargs):
        t = real_setup(*args, **kwargs)

        def spy(fn, model, *rest):
            if model is t.reference:
                calls.append(1)
            return real(fn, model, *rest)

        monkeypatch.setattr(T, "score_batch", spy)
        return t

    monkeypatch.setattr(T, "setup", setup)
    return calls


@pytest.mark.parametrize("method, block", [("grpo", GRPO), ("rebel", {"rebel": {"eta": 0.1}})])
def test_a_loss_without_the_reference_skips_its_pass_unless_the_kl_is_measured(method, block, train_inputs,
                                                                               tmp_path, monkeypatch):
    """GRPO at kl_coef 0 and REBEL read no reference log-probs: with train.measure_kl false the
    reference is never run, the run logs no kl and trains exactly as with the KL measured."""
    monkeypatch.setattr(T, "Grader", _Alternating)
    model, prompts, _ = train_inputs
    settings = {**_grpo_settings(steps=2), **block, "method": method}
    calls = _count_reference_scorings(monkeypatch)
    measured = T.train(settings, model, prompts, None, tmp_path / "measured", *RUNTIME)
    assert len(calls) == 2 and measured["history"]["kl"].notna().all()
    calls.clear()
    skipped = T.train({**settings, "measure_kl": False}, model, prompts, None, tmp_path / "skipped", *RUNTIME)
    assert calls == [] and "kl" not in skipped["history"] and skipped["summary"]["kl_last"] is None
    assert skipped["history"]["loss"].tolist() == measured["history"]["loss"].tolist()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "measured" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "skipped" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kl_penalty_keeps_the_reference_pass(train_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "Grader", _Alternating)
    model, prompts, _ = train_inputs
    calls = _count_reference_scorings(monkeypatch)
    penalised = {**_grpo_settings(steps=1), "grpo": {**GRPO["grpo"], "kl_coef": 0.01}, "measure_kl": False}
    run = T.train(penalised, model, prompts, None, tmp_path / "kl", *RUNTIME)
    assert calls == [1] and run["history"]["kl"].notna().all() and "kl_k3" in run["history"]


def test_entropy_bonus_is_subtracted_from_the_loss(train_inputs, tmp_path):
    """Same weights and draws at step 1: the loss with entropy_coef c is the loss without it
    minus c x the logged entropy."""
    plain = T.train({**SETTINGS, "steps": 1}, *train_inputs, tmp_path / "plain", *RUNTIME)["history"]
    bonus = T.train({**SETTINGS, "steps": 1, "entropy_coef": 0.5}, *train_inputs, tmp_path / "bonus", *RUNTIME)["history"]
    assert "entropy" not in plain and bonus["entropy"].iloc[0] > 0
    assert bonus["loss"].iloc[0] == pytest.approx(plain["loss"].iloc[0] - 0.5 * bonus["entropy"].iloc[0], abs=1e-5)


def test_entropy_matches_the_full_softmax(tiny_demo):
    from apo.scoring import token_logprobs_and_entropy

    model = AutoModelForCausalLM.from_pretrained(tiny_demo / "model").eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    logp, ent, mask = token_logprobs_and_entropy(model, prompts, responses, pad_id=0, temperature=0.7)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        full = (model(input_ids=torch.tensor([p + r])).logits[0] / 0.7).log_softmax(-1)
        rows = full[len(p) - 1 : len(p) - 1 + len(r)]
        assert ent[b, : len(r)].tolist() == pytest.approx((-(rows.exp() * rows).sum(-1)).tolist(), abs=1e-5)
        assert logp[b, : len(r)].tolist() == pytest.approx([rows[t, tok].item() for t, tok in enumerate(r)], abs=1e-5)


def test_logits_are_computed_from_the_shortest_prompts_end_only(tiny_demo, monkeypatch):
    """The output layer runs from the last token of the shortest prompt on (transformers'
    logits_to_keep); log-probs, entropies and gradients are those of the full logits, and a
    model whose forward takes no logits_to_keep gets the full logits."""
    from apo import scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_demo / "model").eval()
    prompts, responses = [[5, 6, 7, 8, 9], [8, 9, 10], [3, 4, 5, 6]], [[10, 11], [12, 13, 14], [15]]
    widths = []
    model.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[1]))

    def scored(window: bool):
        monkeypatch.setattr(scoring, "accepts_logits_to_keep", lambda m: window)
        model.zero_grad(set_to_none=True)
        logp, ent, mask = scoring.token_logprobs_and_entropy(model, prompts, responses, pad_id=0, temperature=0.7)
        ((logp + ent) * mask).sum().backward()
        return logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    windowed, full = scored(True), scored(False)
    assert widths == [7 - 2, 7]  # sequences of up to 7 tokens; the shortest prompt's last token at position 2
    torch.testing.assert_close(windowed[0], full[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(windowed[1], full[1], rtol=0, atol=1e-6)
    for a, b in zip(windowed[2], full[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    monkeypatch.undo()

    class Wrapper(torch.nn.Module):  # as DDP holds the model: `.module`, forward(*args, **kwargs)
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(tiny_demo / "model", num_labels=1)
    assert scoring.accepts_logits_to_keep(model) and scoring.accepts_logits_to_keep(Wrapper(model))
    assert not scoring.accepts_logits_to_keep(critic)


def test_require_eos_zeroes_the_reward_of_truncated_responses(train_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "Grader", _FakeGrader)
    short = {**SETTINGS, "steps": 1, "max_new_tokens": 2}
    kept = T.train(short, *train_inputs, tmp_path / "kept", *RUNTIME)["history"]
    cut = T.train({**short, "require_eos": True}, *train_inputs, tmp_path / "cut", *RUNTIME)["history"]
    assert kept["truncated"].iloc[0] > 0.5
    assert kept["reward"].iloc[0] == 1.0
    assert cut["reward"].iloc[0] == pytest.approx(1 - cut["truncated"].iloc[0])


def test_corrupt_last_checkpoint_is_set_aside_and_the_previous_one_used(train_inputs, tmp_path, caplog):
    """A damaged newest checkpoint must not block training forever: the rerun warns, moves it
    to corrupt-step-N and resumes from the one before."""
    out = tmp_path / "run"
    T.train({**SETTINGS, "steps": 4, "checkpoint_every": 2}, *train_inputs, out, *RUNTIME)
    shutil.rmtree(out / "model")
    weights = out / "checkpoints" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        res = T.train({**SETTINGS, "steps": 4, "checkpoint_every": 2}, *train_inputs, out, *RUNTIME)
    assert "step-000004 does not load" in caplog.text and "corrupt-step-000004" in caplog.text
    assert (out / "checkpoints" / "corrupt-step-000004").is_dir()
    assert res["history"]["step"].tolist() == [1, 2, 3, 4]  # steps 3 and 4 trained again
    assert (out / "checkpoints" / "step-000004" / "model.safetensors").stat().st_size > 1000


class _Planted:
    """What a crafted file in a shared results folder would hold: a pickle that runs code when
    it is unpickled (here: it creates the file its argument names)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resuming_unpickles_nothing_from_a_checkpoint(train_inputs, tmp_path):
    """Every file of a checkpoint is JSON or tensors; a pickle planted in place of any file
    that is not JSON or safetensors runs nothing when the run resumes: the checkpoint does not
    load, is set aside, and the one before is used. One rerun per such file, each planted
    alone, so that no earlier failure to load hides a later file's."""
    import pickle

    out = tmp_path / "run"
    settings = {**SETTINGS, "steps": 2, "checkpoint_every": 1}
    T.train(settings, *train_inputs, out, *RUNTIME)
    shutil.rmtree(out / "model")
    last = Path("checkpoints") / "step-000002"
    planted = sorted(p.name for p in (out / last).iterdir() if p.suffix not in (".json", ".safetensors"))
    assert planted  # the optimizer's state
    for name in planted:
        run, marker = tmp_path / f"run-{name}", tmp_path / f"code-ran-{name}"
        shutil.copytree(out, run)
        (run / last / name).write_bytes(pickle.dumps(_Planted(marker)))
        res = T.train(settings, *train_inputs, run, *RUNTIME)
        assert not marker.exists(), name
        assert (run / "checkpoints" / "corrupt-step-000002").is_dir()
        assert res["history"]["step"].tolist() == [1, 2]  # step 2 trained again from step 1's checkpoint
    assert {Path(name).suffix for name in planted} == {".pt"}  # tensors, loaded with weights_only=True


def test_phase_clock_waits_for_this_process_gpu(monkeypatch):
    """CUDA runs kernels asynchronously: each phase's clock reading first waits for them, on
    the process's own GPU (in a 4-GPU job rank 2 waits for cuda:2, not the current device)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    T.clock(torch.device("cuda", 2))
    T.clock(torch.device("cpu"))  # a CPU trainer waits for nothing, even where CUDA exists
    assert calls == [torch.device("cuda", 2)]


@pytest.mark.parametrize("local_rank", [0, 1, 2, 3])
def test_each_process_of_a_four_gpu_job_claims_its_own_gpu(monkeypatch, local_rank):
    """torchrun/accelerate give each process LOCAL_RANK; the trainer makes that GPU current
    before anything touches CUDA (otherwise every process works on GPU 0)."""
    claimed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: claimed.append(d))
    T.claim_local_device({"WORLD_SIZE": "4", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank)})
    assert claimed == [local_rank]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    T.claim_local_device({"LOCAL_RANK": "1"})  # no GPU: nothing to claim
    assert claimed == [local_rank]


def test_setup_claims_the_device_before_the_accelerator_and_the_engine(monkeypatch, train_inputs, tmp_path):
    """The order matters: the device is claimed first, then accelerate and the engine start."""
    order = []
    monkeypatch.setattr(T, "claim_local_device", lambda: order.append("device"))
    real_accelerator, real_generator = T.make_accelerator, T.make_generator
    monkeypatch.setattr(T, "make_accelerator", lambda *a: order.append("accelerator") or real_accelerator(*a))
    monkeypatch.setattr(T, "make_generator", lambda *a, **k: order.append("engine") or real_generator(*a, **k))
    T.setup({**SETTINGS, "steps": 1}, *train_inputs, tmp_path, RUNTIME[0], False)
    assert order == ["device", "accelerator", "engine"]


def test_ppo_critic_trains_without_dropout(train_inputs):
    """The critic is the model with a fresh one-label head; transformers gives that head a
    dropout of 0.1 when the config names none (Qwen2's does not). verl's critic turns dropout
    off (ZhaolinGao/A-PO, verl/workers/fsdp_workers.py:587-588): values are regressed, and
    dropout would make the value of one state differ between two forward passes."""
    from accelerate import Accelerator

    _, critic = T.load_models({**SETTINGS, **PPO, "method": "ppo"}, train_inputs[0], Accelerator(), False)[1:]
    critic.train()
    assert all(m.p == 0 for m in critic.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(critic(ids).logits, critic(ids).logits, rtol=0, atol=0)


def test_validation_scores_the_policy_apart_from_training_time(train_inputs, tmp_path, monkeypatch):
    """Greedy validation at step 0, every validate_every steps and at the last step; each row
    carries the training time so far (the sum of time_step_s, which never includes the
    validation's own time), and the validation goes to the tracker at its step."""
    monkeypatch.setattr(T, "Grader", _Alternating)  # 1, 0, 1, 0, ...: accuracy is the share of even rows

    class Tracker:
        logged = []

        def log_metrics(self, metrics, step):
            self.logged.append((step, metrics))

        def set_tags(self, tags):
            pass

    real_score = T.validate.score

    def slow_score(*args):  # a validation that takes visible time, inside its own clock
        import time
        time.sleep(0.3)
        return real_score(*args)

    monkeypatch.setattr(T.validate, "score", slow_score)
    tracker = Tracker()
    res = T.train({**SETTINGS, "steps": 5}, *train_inputs, tmp_path / "run", *RUNTIME, tracker=tracker,
                  validation_path=str(tmp_path / "valid.parquet"))
    v, h = res["validation"], res["history"]
    assert v["step"].tolist() == [0, 2, 4, 5]
    cumulative = [0.0] + h["time_step_s"].cumsum().tolist()
    assert v["train_time_s"].tolist() == pytest.approx([cumulative[s] for s in v["step"]])
    assert (v["time_validate_s"] >= 0.3).all() and (h["time_step_s"] < v["time_validate_s"].sum()).all()
    assert v["n"].tolist() == [12] * 4 and v["k"].tolist() == [1] * 4
    assert v["accuracy"].tolist() == pytest.approx([0.5] * 4)  # 6 of 12 rows graded right
    assert res["summary"]["val_accuracy_final"] == pytest.approx(0.5)
    assert res["summary"]["validate_time_s"] == pytest.approx(v["time_validate_s"].sum())
    assert res["summary"]["train_time_s"] == pytest.approx(h["time_step_s"].sum())
    val_logged = [(step, m) for step, m in tracker.logged if "val_accuracy" in m]
    assert [step for step, _ in val_logged] == [0, 2, 4, 5]
    assert val_logged[1][1]["val_train_time_s"] == pytest.approx(cumulative[2])


def test_without_a_validation_set_nothing_is_validated(train_inputs, tmp_path):
    res = T.train({**SETTINGS, "steps": 1}, *train_inputs, tmp_path / "run", *RUNTIME)
    assert res["validation"].empty and list(res["validation"].columns)[:3] == ["step", "train_time_s", "accuracy"]
    assert res["summary"]["val_accuracy_final"] is None and res["summary"]["validate_time_s"] == 0


def test_the_job_deadline_comes_from_the_scheduler():
    assert T.job_deadline(720, {}) is None  # not under a scheduler: no limit to stop before
    assert T.job_deadline(720, {"SLURM_JOB_ID": "7"}, now=1000.0) == 1000.0 + 720 * 60
    assert T.job_deadline(720, {"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "5000"}, now=1000.0) == 5000.0


def test_a_step_that_may_not_fit_before_the_deadline_stops_the_run():
    deadline = 10_000.0
    assert not T.out_of_time(None, [100.0], 9_999.0)
    assert not T.out_of_time(deadline, [], 9_999.0)
    # slowest step 200 s: the margin is 3 x 200 = 600 s
    assert not T.out_of_time(deadline, [100.0, 200.0], deadline - 601)
    assert T.out_of_time(deadline, [100.0, 200.0], deadline - 599)
    # fast steps: at least SAFETY_S (300 s) for the checkpoint and the exit
    assert T.out_of_time(deadline, [1.0], deadline - 299) and not T.out_of_time(deadline, [1.0], deadline - 301)


def test_a_run_cut_by_the_time_limit_checkpoints_and_the_next_job_finishes_it(train_inputs, tmp_path, monkeypatch):
    """A 4-step run in jobs whose time runs out after step 1 (checkpoint_every 2, so the stop
    writes a checkpoint of its own): the job stops naming what happens next, and the next job
    resumes there and ends with the uninterrupted run's metrics."""
    settings = {**SETTINGS, "steps": 4, "checkpoint_every": 2}
    straight = T.train(settings, *train_inputs, tmp_path / "straight", *RUNTIME)["history"]
    monkeypatch.setattr(T, "job_deadline", lambda *a, **k: 1.0)
    monkeypatch.setattr(T, "out_of_time", lambda deadline, steps, now: len(steps) == 1)
    out = tmp_path / "pieces"
    with pytest.raises(T.TimeLimitReached, match="stopped after step 1 of 4 .* resumes from this step"):
        T.train(settings, *train_inputs, out, *RUNTIME, time_limit_min=10)
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-000001"]
    assert not (out / "model").exists()
    monkeypatch.undo()
    resumed = T.train(settings, *train_inputs, out, *RUNTIME)["history"]
    pd.testing.assert_frame_equal(resumed.filter(regex="^(?!time_|peak_)"), straight.filter(regex="^(?!time_|peak_)"))


def test_epochs_give_the_steps_from_the_prompts_trained_on():
    from apo.train import with_epochs

    s = {"epochs": 25, "batch_size": 256, "steps": 100}
    assert with_epochs(s, 7450)["steps"] == 25 * 29  # the tail of each epoch is dropped
    assert with_epochs(s, 7423)["steps"] == 25 * 28
    assert with_epochs({**s, "epochs": None}, 7450)["steps"] == 100  # no epochs: steps as set


# ---------------------------------------------------------------- GRPO variants, engine log-probs


def _family_settings(method: str, **block):
    """Training settings of a GRPO-family method with its schema defaults (its recipe), groups of 4."""
    from apo.config import validate_config

    cfg = {"experiment": "x", "model": "demo", "data": {
        "train": {"path": "demo", "split": "train", "prompt_field": "q", "answer_field": "a"},
        "benchmarks": [{"name": "b", "path": "demo", "split": "test", "prompt_field": "q", "answer_field": "a"}]}}
    defaults = validate_config(cfg)["train"][method]
    return {**{k: v for k, v in SETTINGS.items() if k != "beta2"}, "method": method, "lr": 1e-2,
            method: {**defaults, "group_size": 4, **block}}


@pytest.mark.parametrize("method", ["dr_grpo", "dapo", "gspo"])
def test_grpo_variants_train_a_few_steps(method, train_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "Grader", _Alternating)
    model, prompts, _ = train_inputs
    h = T.train({**_family_settings(method), "steps": 2}, model, prompts, None, tmp_path / method, *RUNTIME)["history"]
    assert h["step"].tolist() == [1, 2] and h["loss"].notna().all() and h["clip_frac"].notna().all()
    assert (h["logprob_gap_mean"] < 1e-4).all()  # float32 everywhere: the engine is the policy
    if method == "dapo":  # dynamic sampling on, every alternating group informative: one draw
        assert h["sampling_draws"].tolist() == [1, 1] and h["groups_dropped"].tolist() == [0, 0]


class _HalfSolved(_FakeGrader):
    """Per grading call, groups of 4 alternate between all right (no advantage) and half right."""

    def grade(self, golds, responses):
        from apo.reward import Grades

        rewards = [1.0 if (i // 4) % 2 == 0 else float(i % 2) for i in range(len(responses))]
        return Grades(rewards, ["ok"] * len(responses), [""] * len(responses))


def test_dynamic_sampling_draws_prompts_until_the_batch_is_full(train_inputs, tmp_path, monkeypatch):
    """DAPO's filter: half of each draw's 8 groups have equal rewards and are dropped, so a
    second draw of 8 other prompts fills the batch; every kept group has an advantage."""
    monkeypatch.setattr(T, "Grader", _HalfSolved)
    model, prompts, _ = train_inputs
    rollouts = []
    real = T.roll_out

    def spy(*args):
        rollouts.append(real(*args))
        return rollouts[-1]

    monkeypatch.setattr(T, "roll_out", spy)
    h = T.train({**_family_settings("dapo"), "steps": 1}, model, prompts, None, tmp_path / "ds", *RUNTIME)["history"]
    assert h["sampling_draws"].tolist() == [2] and h["groups_dropped"].tolist() == [8]
    r = rollouts[0]
    assert len(r.idx) == 8 and len(set(r.idx)) == 8 and r.rewards.view(8, 4).std(-1).min() > 0


def test_dynamic_sampling_stops_when_no_group_has_an_advantage(train_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "Grader", _FakeGrader)  # every response right: nothing to learn from
    model, prompts, _ = train_inputs
    with pytest.raises(RuntimeError, match=r"train\.dapo\.dynamic_sampling: 0 of 8 groups .* after 2 draws"):
        T.train({**_family_settings("dapo", max_draws=2), "steps": 1}, model, prompts, None, tmp_path / "x", *RUNTIME)


class _Tracker:
    def __init__(self):
        self.metrics = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        pass


# (mean, max) |log pi_engine - log pi_trainer| bounds per backend: float32 at most, bfloat16 at least
GAP_BOUNDS = {"hf": ((1e-6, 1e-5), (5e-7, 5e-5)), "vllm": ((1e-6, 1e-5), (1e-4, 1e-3))}


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=VLLM)])
def test_logprob_gap_is_near_zero_in_float32_and_larger_in_bfloat16(backend, train_inputs, tmp_path):
    """The engine's log-probs of the sampled tokens against the trainer's, one step each in
    float32 and in bfloat16, sampled at temperature 0.7 (the engines' log-probs are of the
    tempered distribution, as the trainer's; vLLM's default, raw log-probs, are not).
    hf samples with the policy module itself (under the same autocast as the trainer in bf16:
    only the KV cache's arithmetic differs); vLLM with its own kernels and, in bf16, its own
    bf16 copy of the weights."""
    from accelerate.state import AcceleratorState, GradientState

    gaps = {}
    for dtype in ("float32", "bfloat16"):
        AcceleratorState._reset_state()  # one process trains twice, with different mixed precision
        GradientState._reset_state()
        tracker = _Tracker()
        res = T.train({**SETTINGS, "steps": 1, "compute_dtype": dtype, "backend": backend, "temperature": 0.7}, *train_inputs,
                      tmp_path / dtype, *RUNTIME, tracker=tracker)
        gaps[dtype] = res["history"][["logprob_gap_mean", "logprob_gap_max"]].iloc[0].tolist()
        assert tracker.metrics["logprob_gap_mean"] == gaps[dtype][0]  # logged to MLflow with the step
        assert res["summary"]["logprob_gap_max"] == gaps[dtype][1]
    print(f"{backend} log-prob gap (mean, max):", gaps)
    (fp32_mean, fp32_max), (bf16_mean, bf16_max) = GAP_BOUNDS[backend]
    assert gaps["float32"][0] < fp32_mean and gaps["float32"][1] < fp32_max
    assert gaps["bfloat16"][0] > bf16_mean and gaps["bfloat16"][1] > bf16_max
    assert gaps["bfloat16"][0] > 5 * gaps["float32"][0] and gaps["bfloat16"][1] > 10 * gaps["float32"][1]


def test_validation_rows_copied_from_the_training_set_are_caught_by_their_text(train_inputs, tmp_path, caplog):
    """A validation file that copies the training rows under another name (another path,
    other ids, other spacing) passes the config's source check; training compares problems."""
    from apo import validate

    train = pd.read_parquet(train_inputs[1])
    copy = train.assign(id=[f"other-{i}" for i in range(len(train))], question=train["question"] + "  ")
    copy.to_parquet(tmp_path / "copy.parquet")
    with pytest.raises(validate.OverlapError, match=r"copy.parquet: 16 of the 16 validation problems are training"):
        T.train({**SETTINGS, "steps": 1}, *train_inputs, tmp_path / "run", *RUNTIME,
                validation_path=str(tmp_path / "copy.parquet"))
    held_out = pd.read_parquet(tmp_path / "valid.parquet")
    assert validate.check_held_out(held_out, train, "valid.parquet") == 0
    mixed = pd.concat([held_out.head(6), copy.head(2)])
    with caplog.at_level("WARNING"):
        assert validate.check_held_out(mixed, train, "mixed.parquet") == 2
    assert "2 of the 8 validation problems are also training problems" in caplog.text
