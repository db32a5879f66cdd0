"""The process-wide CPU settings a colocated vLLM engine changes, put back once it has started.

vLLM's CPU worker, started in this process (`apo.generation.VLLMGenerator`), replaces
`torch.set_num_threads` with a function that only logs a warning (vllm/v1/worker/cpu_worker.py,
`CPUWorker.init_device`), so every later call in the process, the trainer's included, is
silently skipped; its platform hook writes `LD_PRELOAD` (torch's libgomp and vLLM's tcmalloc,
vllm/platforms/cpu.py, `check_and_update_config`) into the environment, which every process
started afterwards inherits (the grading workers of a training job). Neither changes a
number the engine computes: the engine runs in this thread, on torch's intra-op pool, with
the thread count it found. `EngineThreads.capture()` before the engine starts and
`restore()` after it give the trainer back exactly the settings it had: the same thread
count and CPU affinity (so results stay bit-identical), a working `torch.set_num_threads`,
and the environment its child processes were started with before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

ENGINE_ENV = ("LD_PRELOAD",)  # what the engine writes for processes it never starts here


@dataclass(frozen=True)
class EngineThreads:
    num_threads: int
    set_num_threads: object
    affinity: frozenset[int] | None
    env: tuple[tuple[str, str | None], ...]

    @classmethod
    def capture(cls) -> "EngineThreads":
        affinity = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        return cls(torch.get_num_threads(), torch.set_num_threads, affinity,
                   tuple((k, os.environ.get(k)) for k in ENGINE_ENV))

    def restore(self) -> list[str]:
        """Put back what differs from the captured state; returns what was put back."""
        fixed = []
        if torch.set_num_threads is not self.set_num_threads:
            torch.set_num_threads = self.set_num_threads
            fixed.append("torch.set_num_threads")
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)
            fixed.append(f"torch threads -> {self.num_threads}")
        if self.affinity is not None and frozenset(os.sched_getaffinity(0)) != self.affinity:
            os.sched_setaffinity(0, self.affinity)
            fixed.append(f"CPU affinity -> {sorted(self.affinity)}")
        for key, value in self.env:
            if os.environ.get(key) != value:
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
                fixed.append(f"environment {key}")
        return fixed
