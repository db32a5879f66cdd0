"""Training checkpoints: atomic saves, and resuming from the newest one that loads.

A checkpoint is a directory `step-NNNNNN` holding accelerate's state (models, optimizers,
schedulers, RNG states of every process) and `trainer_state.json` (step, metric history). It
is written under a hidden name and renamed when complete, so a `step-*` directory is never
half-written by this code; one damaged later (disk, a copy) is set aside and the one before
it used.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

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


def save_checkpoint(accelerator, ckpt_root: Path, step: int, state: dict, keep: int, sharded: dict | None = None) -> None:
    """Every process writes its part (its RNG state; its shards under ZeRO, and of the
    `sharded` {name: (model, optimizer)} under FSDP, in `name/`) into one hidden directory,
    which the main process renames to `step-N` when all are done."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, (model, optimizer) in (sharded or {}).items():
        save_sharded(tmp / name, model, optimizer)
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


def resume(accelerator, ckpt_root: Path, sharded: dict | None = None) -> dict | None:
    """Load the newest checkpoint that loads into the prepared models and optimizers; returns
    its trainer state, or None when there is none (a fresh start).

    A checkpoint that fails to load (truncated file, unreadable state) is set aside with a
    warning naming it, and the previous one is tried.
    """
    for ckpt in reversed(checkpoints(ckpt_root)):
        try:
            state = read_json(ckpt / "trainer_state.json")
            accelerator.load_state(str(ckpt))
            for name, (model, optimizer) in (sharded or {}).items():
                load_sharded(ckpt / name, model, optimizer)
        except Exception as e:  # any failure to read it means: this checkpoint is unusable
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                aside = _set_aside(ckpt)
                log.warning("checkpoint %s does not load (%s: %s); set aside as %s, trying the one before",
                            ckpt, type(e).__name__, str(e)[:200], aside.name)
            accelerator.wait_for_everyone()
            continue
        log.info("resumed from %s at step %d", ckpt, state["step"])
        return state
    return None
