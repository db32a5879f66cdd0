"""apo.checkpoint on its own: the device names safetensors accepts, and one decision for every
process about which checkpoint to resume from."""

import torch
from accelerate import Accelerator

from apo import checkpoint as C


def _parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step(), scheduler.step()
    return [(model, optimizer, scheduler)]


def test_a_data_parallel_cpu_process_loads_tensors_on_the_cpu():
    # accelerate gives the second of two gloo processes device cpu:1; safetensors knows only "cpu"
    assert C.safetensors_device(torch.device("cpu", 1)) == "cpu"
    assert C.safetensors_device(torch.device("cpu")) == "cpu"
    assert C.safetensors_device(torch.device("cuda", 3)) == "cuda:3"


def test_resume_loads_what_save_wrote(tmp_path):
    acc = Accelerator(cpu=True)
    parts = _parts()
    C.save_checkpoint(acc, tmp_path, 1, {"step": 1}, keep=2, parts=parts)
    fresh = [(torch.nn.Linear(3, 2), *parts[0][1:])]
    assert C.resume(acc, tmp_path, fresh) == {"step": 1}
    assert torch.equal(fresh[0][0].weight, parts[0][0].weight)


def test_a_checkpoint_that_fails_on_another_process_is_set_aside_on_all(tmp_path, monkeypatch):
    """If this process loaded step 2 but another did not, resuming from it would leave the
    processes at different steps: every process goes back to step 1 together."""
    acc = Accelerator(cpu=True)
    parts = _parts()
    for step in (1, 2):
        C.save_checkpoint(acc, tmp_path, step, {"step": step}, keep=3, parts=parts)
    others_failed = iter([1.0, 0.0])  # the other process fails on step 2, loads step 1
    monkeypatch.setattr(acc, "reduce", lambda t, reduction: t + next(others_failed))
    assert C.resume(acc, tmp_path, parts) == {"step": 1}
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["corrupt-step-000002", "step-000001"]
