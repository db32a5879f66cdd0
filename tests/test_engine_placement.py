"""Where each process's generation engine runs in a multi-process job, checked on CPU with a
faked launcher environment and a stand-in for vLLM's `LLM` (so it runs without vLLM or a GPU):
one engine per process, on that process's GPU, each with its own compile cache."""

import sys
import types

import pytest

from apo.generation import VLLMGenerator, VLLMSettings, engine_cache_root, process_engine_args


def launcher_env(rank: int, world: int = 4) -> dict:
    """What torchrun / accelerate launch set for one process of a one-node job."""
    return {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_one_process_uses_vllms_own_executor():
    assert process_engine_args({}) == {}
    assert process_engine_args({"WORLD_SIZE": "1", "RANK": "0"}) == {}


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_each_rank_of_four_builds_an_external_launcher_engine(rank):
    """vLLM's default executor puts its worker on device index 0 whatever the rank; the
    external launcher executor reads LOCAL_RANK and puts the worker on cuda:LOCAL_RANK."""
    assert process_engine_args(launcher_env(rank)) == {"distributed_executor_backend": "external_launcher"}


def test_a_multi_process_environment_without_its_rank_is_an_error():
    env = launcher_env(1)
    del env["LOCAL_RANK"], env["MASTER_PORT"]
    with pytest.raises(RuntimeError, match="LOCAL_RANK, MASTER_PORT is not set"):
        process_engine_args(env)


def test_each_rank_compiles_into_its_own_cache(tmp_path):
    roots = {engine_cache_root({**launcher_env(r), "VLLM_CACHE_ROOT": str(tmp_path)}) for r in range(4)}
    assert roots == {str(tmp_path / f"rank-{r}") for r in range(4)}
    assert engine_cache_root({"VLLM_CACHE_ROOT": str(tmp_path)}) is None  # one process: vLLM's own
    default = engine_cache_root({**launcher_env(2), "XDG_CACHE_HOME": str(tmp_path)})
    assert default == str(tmp_path / "vllm" / "rank-2")  # vLLM's default root, per rank
    again = {**launcher_env(2), "VLLM_CACHE_ROOT": default}
    assert engine_cache_root(again) == default  # a second engine in the process: not nested again


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module whose LLM records the arguments it was built with."""
    built = []

    class LLM:
        def __init__(self, **kwargs):
            built.append(kwargs)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM))
    return built


@pytest.mark.parametrize("rank", [0, 3])
def test_the_engine_of_rank_r_is_built_for_rank_r(fake_vllm, monkeypatch, tmp_path, rank):
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path))
    for key, value in launcher_env(rank).items():
        monkeypatch.setenv(key, value)
    VLLMGenerator("model", None, seed=0, max_model_len=64, stop_ids=[1], settings=VLLMSettings(), device="cuda")
    (args,) = fake_vllm
    assert args["distributed_executor_backend"] == "external_launcher"
    assert args["enable_sleep_mode"] is True and args["gpu_memory_utilization"] == 0.3
    import os

    assert os.environ["VLLM_CACHE_ROOT"] == str(tmp_path / f"rank-{rank}")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the external launcher needs it


def test_a_one_process_engine_keeps_vllms_defaults(fake_vllm, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    VLLMGenerator("model", None, seed=0, max_model_len=64, stop_ids=[1], device="cpu",
                  settings=VLLMSettings(cpu_kvcache_gib=0.5))
    assert "distributed_executor_backend" not in fake_vllm[0]


def _llama_dir(tmp_path, **shape) -> str:
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **shape}))
    return str(tmp_path)


def test_the_cpu_kv_cache_holds_the_engines_sequences_and_no_more(tmp_path):
    """Keys and values of 256 sequences at the full context (whole 32-token blocks, one
    spare), float32: a 2-layer model with 2 KV heads of 16 needs 256 * 8 * 32 * 512 bytes
    at a 200-token context; a 30-layer SmolLM2-135M would need 4.5 GB at 352 tokens: capped at
    vLLM's former fixed 1 GiB."""
    from apo.generation import cpu_kv_cache_bytes

    small = _llama_dir(tmp_path, num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=320)
    assert cpu_kv_cache_bytes(small, 200, VLLMSettings()) == 256 * 8 * 32 * (2 * 2 * 2 * 16 * 4)
    (tmp_path / "smol").mkdir()
    smol = _llama_dir(tmp_path / "smol", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                      num_key_value_heads=3, intermediate_size=1536, vocab_size=49152)
    assert cpu_kv_cache_bytes(smol, 352, VLLMSettings()) == 1 << 30
    assert cpu_kv_cache_bytes(smol, 352, VLLMSettings(cpu_kvcache_gib=2)) == 2 << 30  # the config's, as given


def test_the_engine_gets_its_kv_cache_size_and_no_legacy_variable(fake_vllm, monkeypatch, tmp_path):
    """vLLM's VLLM_CPU_KVCACHE_SPACE (whole GiB) would override the size passed; a GPU engine
    sizes its cache by gpu_memory_utilization instead."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    model = _llama_dir(tmp_path, num_hidden_layers=1, hidden_size=32, num_attention_heads=1, intermediate_size=64,
                       vocab_size=320)
    VLLMGenerator(model, None, seed=0, max_model_len=100, stop_ids=[1], device="cpu")
    assert fake_vllm[0]["kv_cache_memory_bytes"] == 256 * 5 * 32 * (2 * 1 * 1 * 32 * 4)
    assert fake_vllm[0]["block_size"] == 32  # the blocks the size counts
    import os

    assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
    VLLMGenerator(model, None, seed=0, max_model_len=100, stop_ids=[1], device="cuda")
    assert fake_vllm[1]["kv_cache_memory_bytes"] is None and fake_vllm[1]["block_size"] is None
