"""Watching a training run: the collapse detector and peak memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CollapseMonitor:
    """Flags a training collapse: reward or response length falling far below where it began.

    Compares the mean over the last `window` steps with the mean over the first `window`.
    """

    window: int = 20
    reward_ratio: float = 0.5
    length_ratio: float = 0.3
    history: list = field(default_factory=list)
    message: str | None = None

    def update(self, reward: float, length: float) -> str | None:
        """Record one step; returns the message on the step a collapse is first detected."""
        self.history.append((reward, length))
        w = self.window
        if self.message is not None or len(self.history) < 2 * w:
            return None
        r0 = sum(h[0] for h in self.history[:w]) / w
        l0 = sum(h[1] for h in self.history[:w]) / w
        r1 = sum(h[0] for h in self.history[-w:]) / w
        l1 = sum(h[1] for h in self.history[-w:]) / w
        step = len(self.history)
        if r0 > 0 and r1 < self.reward_ratio * r0:
            self.message = f"reward collapsed at step {step}: {r1:.3f} (first {w} steps: {r0:.3f})"
        elif l1 < self.length_ratio * l0:
            self.message = f"response length collapsed at step {step}: {l1:.1f} tokens (was {l0:.1f})"
        return self.message


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
