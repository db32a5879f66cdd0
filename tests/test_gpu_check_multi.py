"""The GPU check's multi-GPU mode (apo.tools.gpu_check_multi, `scripts/gpu-check.sh --gpus N`): how it
launches its ranks, which training it picks with and without vLLM, the per-rank placement and
engine-cycle checks, the table, and (slow) a two-process CPU run with a vLLM engine per rank."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apo import memory
from apo import train as T
from apo.config import vllm_available
from apo.tools import gpu_check as G
from apo.tools import gpu_check_multi as M

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_ranks_are_launched_as_the_training_rule_launches_them():
    cmd = M.launch_command(4, 29500, "cuda", "fsdp", Path("/tmp/job.json"), python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    config = cmd[cmd.index("--config_file") + 1]
    assert Path(config) == ROOT / "workflow" / "accelerate" / "fsdp.yaml" and Path(config).is_file()
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--main_process_port") + 1] == "29500"
    assert cmd[-3:] == ["--module", "apo.tools.gpu_check_multi", "/tmp/job.json"]
    ddp = M.launch_command(2, 1, "cuda", "ddp", Path("j"), python="py")
    assert Path(ddp[ddp.index("--config_file") + 1]).name == "ddp.yaml"  # the fallback's own config


def test_cpu_ranks_are_launched_by_torchrun_without_gpus():
    cmd = M.launch_command(2, 29501, "cpu", "fsdp", Path("job.json"), python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29501",
                   "--module", "apo.tools.gpu_check_multi", "job.json"]
    env = M.launch_env("cpu", {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["ACCELERATE_USE_CPU"] == "true" and env["PATH"] == "/bin"
    assert M.launch_env("cuda", {"CUDA_VISIBLE_DEVICES": "0,1"})["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_the_number_of_gpus_is_every_visible_one_or_as_asked():
    assert M.resolve_gpus("auto", 4, "cuda") == 4
    assert M.resolve_gpus("2", 8, "cuda") == 2
    assert M.resolve_gpus("auto", 0, "cpu") == 2 and M.resolve_gpus("3", 0, "cpu") == 3
    for requested, visible, says in [("auto", 1, "needs 2 or more GPUs; 1 visible"), ("1", 4, "needs 2 or more"),
                                     ("8", 4, "4 GPUs are visible"), ("two", 4, "a number of GPUs")]:
        with pytest.raises(SystemExit, match=says):
            M.resolve_gpus(requested, visible, "cuda")


def test_without_vllm_the_mode_says_so_and_runs_what_the_trainer_accepts():
    colocated, fallback = M.colocated_mode(True), M.colocated_mode(False)
    assert (colocated["distributed"], colocated["backend"], colocated["colocated"]) == ("fsdp", "vllm", True)
    assert (fallback["distributed"], fallback["backend"], fallback["colocated"]) == ("ddp", "hf", False)
    assert "vLLM is not installed" in fallback["note"] and "cannot run" in fallback["note"]
    # the trainer's own rule decides: fsdp with the hf engine over two processes is refused
    with pytest.raises(NotImplementedError):
        T.check_distributed({"backend": "hf"}, "fsdp", 2)
    for mode in (colocated, fallback):
        T.check_distributed({"backend": mode["backend"]}, mode["distributed"], 2)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_per_gpu_sizes_make_a_valid_batch_layout_on_any_number_of_gpus(n):
    p = M.for_gpus(M.FSDP, n)
    assert p.prompts == 8 * n and p.mini_batch_size == 4 * n and p.arch == G.QWEN25_1_5B
    layout = T.batch_layout({"batch_size": p.prompts, "mini_batch_size": p.mini_batch_size,
                             "micro_batch_size": p.micro_batch_size}, n)
    assert layout == (2, 4)  # two mini-batches of four micro-batches on every rank, whatever n


def rank(i: int, local: int | None = None, **where) -> dict:
    dev = f"cuda:{i if local is None else local}"
    return {"rank": i, "local_rank": i if local is None else local, "trainer": dev, "policy": dev, "current": dev,
            "engine": dev, "engine_weights": dev, **where}


def test_four_ranks_on_their_own_gpus_pass_the_placement_check():
    assert M.placement_problems([rank(i) for i in range(4)], "cuda") == []
    cpu = [{**rank(i), **dict.fromkeys(("trainer", "policy", "current", "engine", "engine_weights"), "cpu")}
           for i in range(2)]
    assert M.placement_problems(cpu, "cpu") == []


def test_engines_on_gpu_0_are_caught():
    """The failure of issue 21: every engine built on GPU 0 (and moving the current device)."""
    records = [rank(0), rank(1, engine="cuda:0", engine_weights="cuda:0", current="cuda:0")]
    problems = M.placement_problems(records, "cuda")
    assert "rank 1: engine on cuda:0, expected cuda:1 (LOCAL_RANK 1)" in problems
    assert "rank 1: current on cuda:0, expected cuda:1 (LOCAL_RANK 1)" in problems
    assert "ranks 0, 1 share cuda:0: one GPU per rank" in problems


def test_an_index_less_or_unknown_device_and_a_shared_local_rank_are_caught():
    problems = M.placement_problems([rank(0, engine="cuda"), rank(1, engine_weights=None)], "cuda")
    assert "rank 0: engine on cuda, expected cuda:0 (LOCAL_RANK 0)" in problems
    assert "rank 1: where its engine_weights lives is unknown" in problems
    twice = M.placement_problems([rank(0), rank(1, local=0)], "cuda")  # two ranks told LOCAL_RANK 0
    assert twice == ["ranks 0, 1 share cuda:0: one GPU per rank"]
    assert M.placement_problems([rank(0)], "cpu")[0] == "rank 0: trainer on cuda:0, expected cpu (LOCAL_RANK 0)"


def test_a_rank_records_its_trainer_policy_and_engine_devices():
    from apo.generation import HFGenerator

    class Tok:
        eos_token_id, pad_token_id = 1, 0

    model = torch.nn.Linear(2, 2)
    model.generation_config = None
    t = SimpleNamespace(accelerator=SimpleNamespace(process_index=1, device=torch.device("cpu", 0)), policy=model,
                        generator=HFGenerator(model, Tok()))
    record = M.placement_record(t, local_rank=1)
    assert record == {"rank": 1, "local_rank": 1, "trainer": "cpu", "policy": "cpu", "current": "cpu",
                      "engine": "cpu", "engine_weights": "cpu"}
    assert M.device_label(torch.device("cuda", 3)) == "cuda:3" and M.device_label("cuda") == "cuda"


class FakeEngine:
    """Sleeps when asked (or not, `sleeps=False`); wakes in the sync unless `wakes=False`."""

    def __init__(self, sleeps=True, wakes=True):
        self.asleep, self.sleeps, self.wakes, self.synced = False, sleeps, wakes, 0

    def sleep(self):
        self.asleep = self.sleeps

    def sync_weights(self, model):
        self.asleep = self.asleep and not self.wakes
        self.synced += 1


def cycle(engine, steps=2):
    memory_ = M.PhaseMemory(torch.device("cpu"))
    memory_.watch(engine)
    for _ in range(steps):  # what train_step calls, in its order
        engine.sleep()
        engine.sync_weights(None)
    assert engine.synced == steps  # the wrapped engine still syncs
    return memory_.summary()["engine_events"]


def test_an_engine_that_sleeps_through_the_update_and_wakes_for_the_sync_passes():
    events = cycle(FakeEngine())
    assert events == [{"asleep_in_update": True, "asleep_at_sync": True, "awake_after_sync": True}] * 2
    assert M.engine_cycle(events, expect_sleep=True) == ("slept, woke (2 steps)", [])
    assert M.engine_cycle(cycle(FakeEngine(sleeps=False)), expect_sleep=False) == ("awake throughout (2 steps)", [])


def test_an_engine_awake_in_the_update_or_asleep_after_the_sync_fails():
    label, problems = M.engine_cycle(cycle(FakeEngine(sleeps=False)), expect_sleep=True)
    assert label == "did not sleep (2 steps)"
    assert problems == [f"step {i}: the engine was awake during the update (sleep mode is on)" for i in (1, 2)]
    _, problems = M.engine_cycle(cycle(FakeEngine(wakes=False), steps=1), expect_sleep=True)
    assert problems == ["step 1: the engine was not awake after the weight sync"]
    assert M.engine_cycle([], expect_sleep=True)[1] == ["no training step reached the engine's sleep"]


def measured(i: int) -> dict:
    return {**rank(i), "engine_cycle": "slept, woke (2 steps)", "peak_generate_gb": 60.123, "peak_update_gb": 41.5,
            "peak_allocated_gb": 60.123, "peak_reserved_gb": 70.0, "device_used_gb": 75.25, "plan_generate_gb": 63.9,
            "plan_update_gb": 40.04, "plan_peak_gb": 63.9, "plan_phase": "generate"}


def test_the_table_puts_each_ranks_peaks_beside_the_plan():
    rows = [measured(1), measured(0), {**measured(2), "peak_reserved_gb": None, "device_used_gb": None}]
    table = M.rank_table(rows)
    lines = table.splitlines()
    assert len(lines) == 5 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 0", "| 1", "| 2"]  # in rank order
    assert lines[2] == ("| 0 | cuda:0 | cuda:0 | cuda:0 | slept, woke (2 steps) | 60.12 | 41.50 | 60.12 | 70.00 | "
                        "75.25 | 63.90 | 40.04 | 63.90 (generate) |")
    assert "| 60.12 | – | – | 63.90 |" in lines[4]
    report = {"profile": {"name": "fsdp", "prompts": 16, "response_tokens": 512, "steps": 2},
              "inputs": {"parameters": G.QWEN25_1_5B_PARAMETERS},
              "run": {"gpus": 2, "device_name": "NVIDIA H100", "date": "d", "config": "c", "launcher": "l",
                      "mode": M.colocated_mode(True)},
              "order": ["apo", "ppo"], "methods": {"apo": {"status": "ok", "ranks": rows[:2]},
                                                   "ppo": {"status": "timed out after 9 s"}}}
    text = M.describe(report)
    assert "## apo: ok" in text and "## ppo: timed out after 9 s" in text and text.count("| rank | trainer |") == 1
    assert "(8 per rank)" in text and "1,543,714,304 parameters" in text


def test_the_plan_estimate_is_the_sharded_job_with_this_gpu_and_these_prompts(tmp_path):
    pytest.importorskip("jsonschema")
    tok = G.make_tokenizer(["a b c"] * 4, vocab_size=G.QWEN25_1_5B.vocab_size, bpe_vocab=300)
    G.model_config(G.QWEN25_1_5B, tok).to_json_file(tmp_path / "config.json")
    profile = M.for_gpus(M.FSDP, 2)
    config = G.check_config(profile, G.PAPER_CONFIG, backend="hf", train_resources={"gpu": 2, "distributed": "ddp"})
    short, long = (M.plan_estimate(config, "apo", str(tmp_path), p, gpu_memory_gb=80.0) for p in (64, 1024))
    assert long["plan_update_gb"] > short["plan_update_gb"]  # the plan's sequence is prompt + response
    unsized = M.plan_estimate(config, "apo", str(tmp_path), 64, gpu_memory_gb=None)
    assert unsized == short  # the hf engine's KV cache does not depend on the GPU's size
    if vllm_available():  # vLLM's share of this GPU is counted while generating
        config = G.check_config(profile, G.PAPER_CONFIG, backend="vllm",
                                train_resources={"gpu": 2, "distributed": "fsdp"})
        with_gpu = M.plan_estimate(config, "apo", str(tmp_path), 64, gpu_memory_gb=80.0)
        without = M.plan_estimate(config, "apo", str(tmp_path), 64, gpu_memory_gb=None)
        share = config["generation"]["vllm"]["gpu_memory_utilization"] * 80
        assert with_gpu["plan_generate_gb"] == pytest.approx(without["plan_generate_gb"] + share)
        job = memory.job_from_config({**config, "resources": {**config["resources"], "train": {
            **config["resources"]["train"], "gpu_memory_gb": 80.0}}}, "apo", "apo")
        assert (job.gpus, job.distributed, job.backend) == (2, "fsdp", "vllm")


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_two_cpu_ranks_train_under_fsdp_with_an_engine_each(tmp_path):
    """scripts/gpu-check.sh --tiny --gpus 2: two torchrun processes, FSDP, a vLLM CPU engine per
    rank, two steps with the weight sync; one row per rank beside the plan."""
    env = {**os.environ, "PYTHON": sys.executable, "APO_WHEELS": str(tmp_path / "no-wheels")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--tiny", "--gpus", "2", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check-multi.json").read_text())
    assert report["run"]["gpus"] == 2 and report["run"]["mode"]["distributed"] == "fsdp"
    assert report["order"] == ["apo"] and report["methods"]["apo"]["status"] == "ok"
    ranks = report["methods"]["apo"]["ranks"]
    assert sorted((r["rank"], r["local_rank"]) for r in ranks) == [(0, 0), (1, 1)]
    for r in ranks:
        assert {r[k] for k in ("trainer", "policy", "engine", "engine_weights")} == {"cpu"}
        assert r["engine_cycle"] == "awake throughout (2 steps)" and r["problems"] == []  # no sleep mode on CPU
        assert len(r["steps"]) == 2 and all(s["time_sync_s"] > 0 and s["time_generate_s"] > 0 for s in r["steps"])
        assert r["peak_allocated_gb"] > 0 and r["peak_reserved_gb"] is None
        assert r["plan_peak_gb"] > memory.OTHER_GIB and r["plan_phase"] in ("generate", "update")
    assert "| 0 | cpu | cpu | cpu | awake throughout (2 steps) |" in proc.stdout
    assert "| 1 | cpu | cpu | cpu |" in (tmp_path / "gpu-check-multi.md").read_text()
