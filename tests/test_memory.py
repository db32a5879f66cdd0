"""The memory plan (src/apo/memory.py): each part against hand arithmetic on a made-up model,
the parameter counts against transformers' own models, and the dry run that prints the plan
or stops on a job that cannot fit."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from apo import memory
from apo.config import validate_config
from apo.memory import GIB, Job, MemoryPlanError, ModelShape, estimate
from conftest import ROOT

# A made-up Qwen2-style model small enough to count by hand: hidden 8, 3 layers, 2 heads of
# width 4 with 1 key/value head (q width 8, kv width 4), intermediate 16, vocabulary 32, tied.
TINY = ModelShape(
    hidden_size=8,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=16,
    vocab_size=32,
    tie_word_embeddings=True,
    source="made up",
)
# One layer: q 8*8 + k, v 2*8*4 + o 8*8 = 192, biases 8 + 4 + 4 = 16, MLP 3*8*16 = 384,
# norms 2*8 = 16: 608. Embeddings 32*8 = 256, final norm 8: root 264. Total 3*608 + 264.
LAYER, ROOT_PARAMS, PARAMS = 608, 264, 2088
CRITIC = PARAMS + 8 + 1  # tied: the embedding stays, a scalar head (weight 8, bias 1) is added
CAST = 3 * LAYER + 256  # what autocast casts: the layers and the LM head, not the lookup

JOB = Job(
    label="apo",
    method="apo",
    gpus=1,
    distributed="single",
    batch_size=8,
    micro_batch_size=2,
    samples=1,
    seq_len=10,
    compute_bytes=2,
    reference_bytes=2,
    gradient_checkpointing=True,
    backend="vllm",
    engine_share=0.5,
    engine_sleeps=True,
    generation_batch=4,
    gpu_memory_gb=1.0,
)
TOKENS = 2 * 10
# Bytes a token of one layer under bf16 autocast: attention 8h + 3*2h + 2(q 8 + 2 kv 4) + 2h
# = 64 + 48 + 32 + 16 = 160; MLP 8h + 2*2h + 4*2i = 64 + 32 + 128 = 224.
PER_LAYER = 384
FINAL = 8 * 8 + 2 * 8  # final norm 8h, lm_head input 2h
LOGITS = 16 * TOKENS * 32
ACT_FULL = TOKENS * (3 * PER_LAYER + FINAL) + LOGITS  # 34880
ACT_CKPT = (
    TOKENS * (3 * 4 * 8 + PER_LAYER + FINAL) + LOGITS
)  # layer inputs 4h each, one layer: 21440


def test_parameter_counts_by_hand():
    assert (TINY.layer_params, TINY.root_params, TINY.params, TINY.critic_params) == (
        LAYER,
        ROOT_PARAMS,
        PARAMS,
        CRITIC,
    )
    untied = replace(TINY, tie_word_embeddings=False)
    assert untied.params == PARAMS + 256 and untied.critic_params == CRITIC


def _qwen2_config(shape: ModelShape):
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        tie_word_embeddings=shape.tie_word_embeddings,
        num_labels=1,
    )


@pytest.mark.parametrize(
    "shape",
    [TINY, replace(TINY, tie_word_embeddings=False), *memory.KNOWN_MODELS.values()],
    ids=lambda s: f"{s.source}-tied={s.tie_word_embeddings}",
)
def test_parameter_counts_match_transformers_and_accelerate(shape):
    """Built on the meta device (no memory): transformers' Qwen2 and its token-classification
    twin (the critic) have exactly the counted parameters; accelerate's own estimate of fp32
    training with Adam (weights, gradients, two moments) equals the plan's states."""
    import torch
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification

    with torch.device("meta"):
        policy = Qwen2ForCausalLM(_qwen2_config(shape))
        critic = Qwen2ForTokenClassification(_qwen2_config(shape))
    assert sum(p.numel() for p in policy.parameters()) == shape.params
    assert sum(p.numel() for p in critic.parameters()) == shape.critic_params
    total, _ = calculate_maximum_sizes(policy)
    buffers = sum(b.numel() * b.element_size() for b in policy.buffers())  # RoPE frequencies
    assert total - buffers == 4 * shape.params
    usage = estimate_training_usage(total - buffers, "float32")
    assert memory.states(shape.params, JOB) == (
        usage["model"],
        usage["gradients"],
        0,
        usage["optimizer"],
    )


def test_published_sizes_of_the_paper_models():
    """The counts Qwen's model cards give: 1.54B, 3.09B, 7.61B (non-embedding 1.31B, 2.77B, 6.53B)."""
    sizes = {name: s.params for name, s in memory.KNOWN_MODELS.items()}
    assert sizes == {
        "Qwen/Qwen2.5-1.5B": 1_543_714_304,
        "Qwen/Qwen2.5-3B": 3_085_938_688,
        "Qwen/Qwen2.5-7B": 7_615_616_512,
    }
    body = {name: s.num_hidden_layers * s.layer_params for name, s in memory.KNOWN_MODELS.items()}
    assert [round(b / 1e9, 2) for b in body.values()] == [1.31, 2.77, 6.53]


@pytest.mark.parametrize(
    "distributed, gpus, expected",
    [  # (weights, gradients, of them kept between steps, optimizer) in bytes
        ("single", 1, (4 * PARAMS, 4 * PARAMS, 0, 8 * PARAMS)),
        (
            "ddp",
            2,
            (4 * PARAMS, 8 * PARAMS, 4 * PARAMS, 8 * PARAMS),
        ),  # DDP's buckets double the gradients
        (
            "deepspeed",
            2,
            (4 * PARAMS, 2 * PARAMS, 0, 6 * PARAMS),
        ),  # ZeRO-2: fp32 shard copy + moments / 2
        ("fsdp", 2, (2 * PARAMS, 2 * PARAMS, 0, 4 * PARAMS)),
    ],
)
def test_states_by_sharding(distributed, gpus, expected):
    assert memory.states(PARAMS, replace(JOB, distributed=distributed, gpus=gpus)) == expected


def test_compute_copies_and_reference():
    e = estimate(TINY, JOB)
    # bf16 copies of what goes through a linear layer (layers, LM head), the reference whole
    assert e.compute == 2 * CAST and e.reference == 2 * PARAMS
    fsdp = estimate(TINY, replace(JOB, distributed="fsdp", gpus=2))
    # root unit + two of the three layers in flight, 2c + 4 = 8 bytes each; the trainer shards
    # the reference too (bf16 here: 2 bytes a parameter / 2 GPUs)
    assert fsdp.compute == (ROOT_PARAMS + 2 * LAYER) * 8 and fsdp.reference == PARAMS
    untied = replace(TINY, tie_word_embeddings=False)
    # untied, the embedding and the LM head are units of their own: one of them in flight
    assert estimate(untied, replace(JOB, distributed="fsdp", gpus=2)).compute == (ROOT_PARAMS + 2 * LAYER) * 8
    ddp = estimate(TINY, replace(JOB, distributed="ddp", gpus=2))
    assert ddp.reference == 2 * PARAMS  # whole on every GPU
    fp32 = estimate(TINY, replace(JOB, compute_bytes=4, reference_bytes=4))
    assert fp32.compute == 0 and fp32.reference == 4 * PARAMS


def test_activations_by_hand():
    e = estimate(TINY, JOB)
    assert (e.act_full, e.act_ckpt) == (ACT_FULL, ACT_CKPT) == (34880, 21440)
    grpo = estimate(TINY, replace(JOB, method="grpo", samples=8))
    assert grpo.job.seqs == 16 and grpo.act_full == 8 * ACT_FULL  # linear in the sequences
    # fp32 compute: one shared linear input, every tensor 4 bytes: attention 8h + 4h + 4(8 + 8)
    # + 4*8 = 64 + 32 + 64 + 32, MLP 8h + 4h + 16i = 64 + 32 + 256
    assert memory.layer_activation_bytes(TINY, 4) == 192 + 352


def test_ppo_adds_the_critic_and_its_activations():
    e = estimate(TINY, replace(JOB, method="ppo"))
    critic_cast = 2 * (3 * LAYER + 8 + 1)  # bf16 copies of the layers and the scalar head
    assert e.critic == 16 * CRITIC + critic_cast  # fp32 states + bf16 copies
    assert e.critic_update_only == 4 * CRITIC + critic_cast
    critic_layers = TOKENS * (3 * PER_LAYER + FINAL)  # no logits: a scalar head
    assert e.act_full == ACT_FULL + critic_layers


def test_engine_and_peak_by_hand():
    e = estimate(TINY, JOB)
    share = 0.5 * GIB
    assert (e.engine_awake, e.engine_asleep) == (share, share)  # asleep keeps at most its share
    update = 4 * PARAMS + 4 * PARAMS + 8 * PARAMS + 2 * CAST + 2 * PARAMS + share + ACT_CKPT + GIB
    generate = 4 * PARAMS + 8 * PARAMS + 2 * PARAMS + share + GIB
    assert (e.update_peak(), e.generation_peak(), e.peak(), e.peak_phase) == (
        update,
        generate,
        update,
        "update",
    )
    assert e.peak(checkpointing=False) == update - ACT_CKPT + ACT_FULL
    awake = estimate(TINY, replace(JOB, engine_sleeps=False, gpu_memory_gb=80.0))
    assert awake.engine_asleep == awake.engine_awake == 40 * GIB
    hf = estimate(TINY, replace(JOB, backend="hf", distributed="fsdp", gpus=2))
    # KV cache of 4 sequences of 10 tokens: 3 layers x (k, v) x width 4 x 2 bytes; FSDP gathers the weights
    assert (hf.engine_awake, hf.engine_asleep, hf.engine_generating) == (
        4 * 10 * 3 * 2 * 4 * 2,
        0,
        2 * PARAMS,
    )


def test_under_fsdp_the_critic_adds_only_its_root_and_embedding_in_flight():
    """The critic's layers are gathered after the policy's are freed: in flight at once are
    both roots and the larger of the two networks' other units."""
    job = replace(JOB, method="ppo", distributed="fsdp", gpus=2)
    e, states = estimate(TINY, job), 16 * CRITIC / 2
    # tied: the policy's root holds the embedding; the critic adds its embedding unit, norm and head
    assert e.critic == states + (CRITIC - 3 * LAYER) * 8
    untied = replace(TINY, tie_word_embeddings=False)
    u = estimate(untied, job)
    critic_params = untied.critic_params
    # untied: the policy's LM head unit is as large as the critic's embedding unit
    assert u.critic == 16 * critic_params / 2 + (critic_params - 3 * LAYER - 256) * 8
    ddp = estimate(TINY, replace(job, distributed="ddp"))
    assert ddp.critic - 20 * CRITIC == 2 * (3 * LAYER + 8 + 1)  # DDP states, autocast copies: nothing shared


def test_fsdp_weight_sync_gathers_one_tensor_at_a_time():
    """The engine's sync holds the largest gathered tensor (the embedding, bf16) and its cast
    shard on top of the awake engine; nothing without sharding."""
    fsdp = estimate(TINY, replace(JOB, distributed="fsdp", gpus=2))
    assert fsdp.engine_generating == TINY.embedding_params * 2 * 1.5
    assert estimate(TINY, JOB).engine_generating == 0
    assert fsdp.generation_peak() - replace(fsdp, engine_generating=0.0).generation_peak() == 3 * TINY.embedding_params


def test_the_hf_engine_under_fsdp_is_refused_by_the_plan():
    hf = estimate(TINY, replace(JOB, backend="hf", distributed="fsdp", gpus=2, gpu_memory_gb=80.0))
    problem = memory.engine_problem(hf)
    assert "the hf engine (generation.train_backend" in problem and "resources.train.distributed: fsdp" in problem
    assert memory.engine_problem(replace(hf, job=replace(hf.job, distributed="ddp"))) is None


def _config(**train_resources) -> dict:
    """Qwen2.5-7B with the settings the numbers below assume, whatever the paper config says."""
    cfg = validate_config(yaml.safe_load((ROOT / "config/paper/qwen2.5-7b.yaml").read_text()))
    cfg["generation"]["backend"] = cfg["generation"]["train_backend"] = "vllm"  # as on the cluster, whatever this machine has
    cfg["generation"]["vllm"].update(gpu_memory_utilization=0.3, sleep=True)
    cfg["prompt"]["max_prompt_tokens"] = 256
    cfg["train"].update(
        compute_dtype="bfloat16",
        reference_dtype="bfloat16",
        gradient_checkpointing=True,
        batch_size=256,
        micro_batch_size=1,
        max_new_tokens=1024,
    )
    cfg["train"]["grpo"]["group_size"] = 8
    cfg["resources"]["train"].update({"distributed": "ddp", **train_resources})
    return cfg


def test_the_7b_paper_model_on_one_gpu_stops_naming_the_settings():
    plan = memory.memory_plan(
        _config(gpu=1, gpu_memory_gb=80), {"apo": "apo", "grpo": "grpo"}, "nowhere"
    )
    with pytest.raises(MemoryPlanError) as err:
        plan.check()
    msg = str(err.value)
    assert (
        "training job 'apo' needs about 147.6 GiB on each GPU, more than resources.train.gpu_memory_gb = 80"
        in msg
    )
    # 7.616e9 parameters x (4 + 4 + 8 + 2 reference) bytes = 127.7 GiB, the bf16 copies of all
    # but the embedding lookup 13.2, the engine asleep 2, activations 3.8 (logits 1280 x
    # 152064 x 16 B = 2.9), other 1
    # under fsdp with the reference sharded too and the untied LM head a unit of its own, two
    # GPUs suffice: the update holds weights 14.2 + gradients 14.2 + optimizer 28.4 + units in
    # flight 7.5 + reference 7.1 + engine asleep 2.0 + activations 3.7 + other 1.0
    assert "resources.train.gpu: 2 with resources.train.distributed: fsdp -> 78.1 GiB" in msg
    assert "training job 'grpo'" in msg
    fits = memory.memory_plan(
        _config(gpu=4, distributed="fsdp", gpu_memory_gb=80), {"apo": "apo"}, "nowhere"
    )
    fits.check()
    assert "yes" in fits.table().splitlines()[-2]


def test_suggestions_name_checkpointing_and_micro_batch():
    cfg = _config(gpu=1, gpu_memory_gb=80)
    cfg["train"].update(gradient_checkpointing=False, micro_batch_size=4)
    msg = str(
        pytest.raises(
            MemoryPlanError, memory.memory_plan(cfg, {"grpo": "grpo"}, "nowhere").check
        ).value
    )
    assert (
        "train.gradient_checkpointing: true ->" in msg
        and "train.micro_batch_size: 1 (now 4) ->" in msg
    )


def test_an_engine_share_too_small_for_the_weights():
    cfg = _config(gpu=4, distributed="fsdp", gpu_memory_gb=80)
    cfg["generation"]["vllm"]["gpu_memory_utilization"] = 0.1
    msg = str(
        pytest.raises(
            MemoryPlanError, memory.memory_plan(cfg, {"apo": "apo"}, "nowhere").check
        ).value
    )
    assert (
        "generation.vllm.gpu_memory_utilization = 0.1 of 80 GiB = 8.0 GiB" in msg
        and "raise it to at least 0.19" in msg
    )


def test_model_size_from_local_config_override_or_error(tmp_path):
    cfg = _config(gpu_memory_gb=80)
    cfg["model"] = "org/unknown-model"
    with pytest.raises(MemoryPlanError, match=r"resources\.train\.model_params"):
        memory.memory_plan(cfg, {"apo": "apo"}, cfg["model"])
    cfg["resources"]["train"]["gpu_memory_gb"] = None
    # No limit: no plan and no error, only a note.
    assert memory.memory_plan(cfg, {"apo": "apo"}, cfg["model"]) is None
    shown = []
    memory.workflow_plan(cfg, {"apo": "apo"}, cfg["model"], shown.append)
    assert shown == [
        "Memory plan: none, the size of model 'org/unknown-model' is unknown here "
        "(set resources.train.model_params to plan it)."
    ]
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "intermediate_size": 16,
                "vocab_size": 32,
                "tie_word_embeddings": True,
            }
        )
    )
    local = memory.model_shape(cfg, str(tmp_path))
    assert local.params == PARAMS - 3 * 16 and local.source.endswith(
        "config.json"
    )  # llama: no q/k/v biases
    cfg["resources"]["train"]["model_params"] = {
        "hidden_size": 8,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 16,
        "vocab_size": 32,
        "tie_word_embeddings": True,
    }
    assert memory.model_shape(cfg, "nowhere").params == PARAMS


def test_schema_accepts_the_new_keys_and_rejects_bad_ones():
    raw = yaml.safe_load((ROOT / "config/paper/qwen2.5-7b.yaml").read_text())
    raw["resources"]["train"]["gpu_memory_gb"] = 80
    assert validate_config(raw)["resources"]["train"]["gpu_memory_gb"] == 80
    raw["resources"]["train"]["gpu_memory_gb"] = 0
    with pytest.raises(ValueError, match=r"resources\.train\.gpu_memory_gb"):
        validate_config(raw)
    raw["resources"]["train"].update(gpu_memory_gb=None, model_params={"hidden_size": 8})
    with pytest.raises(ValueError, match=r"resources\.train\.model_params"):
        validate_config(raw)


def test_apo_plan_command(tmp_path, capsys):
    from apo.cli import main

    over = tmp_path / "gpus.yaml"
    over.write_text("resources:\n  train: {gpu: 4, distributed: fsdp, gpu_memory_gb: 80}\ntrain:\n  gradient_checkpointing: true\n")
    main(["plan", str(ROOT / "config/paper/qwen2.5-3b.yaml"), str(over)])
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-3B (built-in table)" in out and "4 processes, one per GPU, fsdp" in out
    with pytest.raises(SystemExit, match="more than resources.train.gpu_memory_gb = 40"):
        main(["plan", str(ROOT / "config/paper/qwen2.5-3b.yaml"), "--gpu-memory-gb", "40"])


def _dry_run(tmp_path: Path, *configfiles: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SLURM_CONF", None)
    cmd = [
        str(Path(sys.executable).parent / "snakemake"),
        "-n",
        "--profile",
        "slurm",
        "--directory",
        str(tmp_path),
        "--configfile",
        *map(str, configfiles),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)


def test_dry_run_prints_the_plan_of_a_paper_config(tmp_path):
    proc = _dry_run(tmp_path, ROOT / "config/paper/qwen2.5-1.5b.yaml")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Memory plan per GPU"))
    assert "Qwen/Qwen2.5-1.5B (built-in table)" in lines[start]
    assert [line.split()[0] for line in lines[start + 2 : start + 6]] == [
        "apo",
        "grpo",
        "rebel",
        "ppo",
    ]
    print("\n".join(lines[start : start + 7]))


def test_dry_run_stops_when_a_job_cannot_fit(tmp_path):
    over = tmp_path / "small-gpu.yaml"
    over.write_text(
        "resources:\n  train: {gpu: 1, mem_mb: 200000, runtime: 2880, cpus_per_task: 16, gpu_memory_gb: 40}\n"
    )
    proc = _dry_run(tmp_path, ROOT / "config/paper/qwen2.5-7b.yaml", over)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(
        r"training job 'apo' needs about [\d.]+ GiB on each GPU, more than "
        r"resources\.train\.gpu_memory_gb = 40 \(1 process on 1 GPU",
        out,
    ), out[-3000:]
    assert "resources.train.distributed: fsdp" in out
    assert (
        not (tmp_path / "results").exists()
        and not (tmp_path / ".snakemake" / "slurm_logs").exists()
    )


def test_layer_activations_match_what_autograd_saves():
    """A real Qwen2 forward (CPU, bf16 autocast over fp32 weights, and fp32): the tensors
    autograd keeps for backward, weights and their casts aside, are the plan's per-layer
    bytes plus the final norm, and a few small per-token extras (RoPE tables, attention
    log-sum-exp, norm scales, token ids) the plan leaves out."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = ModelShape(64, 2, 4, 2, 160, 256, True)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            **{
                k: getattr(shape, k)
                for k in (
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "vocab_size",
                )
            },
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    )
    ids = torch.randint(0, 256, (2, 48))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # casts of weights, some saved transposed
    weight_shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    for c in (2, 4):
        saved = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = (
                    t.untyped_storage().nbytes(),
                    tuple(t.shape),
                )
            return t

        with (
            torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=c == 2),
        ):
            model.model(input_ids=ids)
        casts = sum(n for n, s in saved.values() if s in weight_shapes)
        acts = sum(n for n, s in saved.values() if s not in weight_shapes)
        planned = 2 * 48 * (2 * memory.layer_activation_bytes(shape, c) + 8 * 64)
        assert 1.0 <= acts / planned < 1.03, (c, acts, planned)
        # bf16: a copy of each layer matrix (biases and norms, 1 % of a layer, stay fp32)
        assert casts == (0 if c == 4 else pytest.approx(2 * 2 * shape.layer_params, rel=0.02))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_logit_bytes_match_the_trainers_log_probs_on_cpu():
    """The trainer's own token_logprobs, forward and backward, with a vocabulary large enough
    that the logits dominate: the high-water mark of the process's resident memory grows by
    LOGIT_BYTES an element of [sequences, length, vocabulary], within 15 %."""
    import re as re_

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from apo.train import token_logprobs

    def resident(field):
        status = Path("/proc/self/status").read_text()
        return int(re_.search(rf"{field}:\s+(\d+)", status).group(1)) * 1024

    # Tensors of 131 MB: the allocator maps and unmaps them whole, so resident memory follows
    # them (small ones are reused from the heap and do not show).
    vocab, seqs, length = 64000, 2, 256
    model = Qwen2ForCausalLM(
        Qwen2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            vocab_size=vocab,
        )
    )
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, vocab, (seqs, length), generator=g).tolist()
    prompts, responses = [r[:1] for r in rows], [r[1:] for r in rows]
    peaks = []
    for _ in range(2):
        base = resident("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
        token_logprobs(model, prompts, responses, 0)[0].sum().backward()
        peaks.append((resident("VmHWM") - base) / (seqs * length * vocab))
        model.zero_grad(set_to_none=True)
    assert max(peaks) == pytest.approx(memory.LOGIT_BYTES, rel=0.15), peaks
