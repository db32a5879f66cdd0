"""Training checkpoints: atomic saves, and resuming from the newest one that loads.

A checkpoint is a directory `step-NNNNNN`. Nothing in it is loaded by executing code (a
crafted file in a shared results folder must not run anything when a run resumes), so no
pickle: tensors are safetensors files or `torch.load(weights_only=True)` files, everything
else is JSON.

- `model.safetensors`, `model_1.safetensors` (PPO's critic): the trained networks' weights;
- `optimizer.pt`, `optimizer_1.pt`: AdamW's state (tensors and numbers, `weights_only`);
- `scheduler.json`, `scheduler_1.json`: the LR schedules' state;
- `rng-<process>.json` (Python's and NumPy's generators, accelerate's step counter) and
  `rng-<process>.safetensors` (torch's CPU and CUDA generators), one pair per process;
- under FSDP `policy/`, `critic/`: each process's shards of the networks and their optimizers
  (`apo.sharding.save_sharded`, torch.distributed.checkpoint, whose metadata is read with a
  restricted unpickler), instead of the model and optimizer files;
- `trainer_state.json`: step, metric and validation history.

The exception is `resources.train.distributed: deepspeed`, whose engine saves and loads its
partitioned state in its own format (through accelerate; it unpickles): resume such a run only
from a results folder you trust.

It is written under a hidden name and renamed when complete, so a `step-*` directory is never
half-written by this code; one damaged later (disk, a copy) is set aside and the one before
it used.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from apo.io import read_json, write_json
from apo.sharding import load_sharded, save_sharded

log = logging.getLogger(__name__)


def checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints, oldest first."""
    return sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; a complete one has been renamed to `step-N`."""
    done = checkpoints(ckpt_root)
    return done[-1] if done else None


def _name(stem: str, i: int, suffix: str) -> str:
    return f"{stem}{'' if i == 0 else f'_{i}'}{suffix}"


def rng_state(accelerator) -> tuple[dict, dict]:
    """This process's generator states: (JSON-able numbers, tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numbers = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
               "step": accelerator.step}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return numbers, tensors


def set_rng_state(accelerator, numbers: dict, tensors: dict) -> None:
    version, internal, gauss = numbers["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = numbers["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    accelerator.step = numbers["step"]


def _deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def save_state(accelerator, directory: Path, parts: list, sharded: dict) -> None:
    """Write every process's share of the training state into `directory` (see the module's
    docstring). parts: (model, optimizer, scheduler) per trained network; sharded: the FSDP
    {name: (model, optimizer)}, which replace the model and optimizer files."""
    from safetensors.torch import save_file, save_model

    if _deepspeed(accelerator):
        accelerator.save_state(str(directory / "deepspeed"))
    numbers, tensors = rng_state(accelerator)
    i = accelerator.process_index
    write_json(directory / f"rng-{i}.json", numbers)
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / f"rng-{i}.safetensors")
    for name, (model, optimizer) in sharded.items():
        save_sharded(directory / name, model, optimizer)
    if not accelerator.is_main_process:
        return
    for k, (model, optimizer, scheduler) in enumerate(parts):
        write_json(directory / _name("scheduler", k, ".json"), scheduler.state_dict())
        if not sharded and not _deepspeed(accelerator):
            save_model(accelerator.unwrap_model(model), str(directory / _name("model", k, ".safetensors")))
            torch.save(optimizer.state_dict(), directory / _name("optimizer", k, ".pt"))


def safetensors_device(device: torch.device) -> str:
    """`device` as safetensors names it: a data-parallel CPU process's device is `cpu:<rank>`,
    which safetensors refuses; it knows one CPU."""
    return "cpu" if device.type == "cpu" else str(device)


def load_state(accelerator, directory: Path, parts: list, sharded: dict) -> None:
    """Load what `save_state` wrote, without unpickling anything but tensors and numbers."""
    from safetensors.torch import load_file, load_model

    if _deepspeed(accelerator):
        accelerator.load_state(str(directory / "deepspeed"))
    i = accelerator.process_index
    set_rng_state(accelerator, read_json(directory / f"rng-{i}.json"), load_file(directory / f"rng-{i}.safetensors"))
    for name, (model, optimizer) in sharded.items():
        load_sharded(directory / name, model, optimizer)
    for k, (model, optimizer, scheduler) in enumerate(parts):
        scheduler.load_state_dict(read_json(directory / _name("scheduler", k, ".json")))
        if not sharded and not _deepspeed(accelerator):
            load_model(accelerator.unwrap_model(model), str(directory / _name("model", k, ".safetensors")),
                       device=safetensors_device(accelerator.device))
            optimizer.load_state_dict(torch.load(directory / _name("optimizer", k, ".pt"), map_location="cpu",
                                                 weights_only=True))


def save_checkpoint(accelerator, ckpt_root: Path, step: int, state: dict, keep: int, parts: list,
                    sharded: dict | None = None) -> None:
    """Every process writes its part (its RNG state; under FSDP its shards of the `sharded`
    {name: (model, optimizer)}, in `name/`) into one hidden directory, which the main process
    renames to `step-N` when all are done."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(accelerator, tmp, parts, sharded or {})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not load to `corrupt-step-N` (kept for inspection, never
    resumed from again)."""
    target = path.with_name(f"corrupt-{path.name}")
    shutil.rmtree(target, ignore_errors=True)
    os.rename(path, target)
    return target


def resume(accelerator, ckpt_root: Path, parts: list, sharded: dict | None = None) -> dict | None:
    """Load the newest checkpoint that loads into the prepared models and optimizers; returns
    its trainer state, or None when there is none (a fresh start).

    A checkpoint that fails to load (truncated file, unreadable state, a file that is not
    plain data) is set aside with a warning naming it, and the previous one is tried.
    """
    from torch.distributed.checkpoint.api import CheckpointException  # not an Exception

    for ckpt in reversed(checkpoints(ckpt_root)):
        error = None
        try:
            state = read_json(ckpt / "trainer_state.json")
            load_state(accelerator, ckpt, parts, sharded or {})
        except (Exception, CheckpointException) as e:  # any failure to read it: this checkpoint is unusable
            error = e
            log.warning("process %d: checkpoint %s does not load (%s: %s)", accelerator.process_index, ckpt,
                        type(e).__name__, str(e)[:200])
        # Every process resumes from the same checkpoint or none does: one that loaded on
        # some processes only is set aside for all.
        if _failed_anywhere(accelerator, error is not None):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                aside = _set_aside(ckpt)
                log.warning("checkpoint %s set aside as %s; trying the one before", ckpt, aside.name)
            accelerator.wait_for_everyone()
            continue
        log.info("resumed from %s at step %d", ckpt, state["step"])
        return state
    return None


def _failed_anywhere(accelerator, failed: bool) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
