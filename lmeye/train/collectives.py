"""The few collectives a training rank makes besides DeepSpeed's own, on the engine's device.

With ``use_gpu`` Ray Train starts an NCCL process group, and NCCL has no CPU backend: a tensor on
the CPU handed to ``all_reduce`` raises on the first micro-step of every multi-GPU run (a one-GPU
run skips the collective and never shows it). So every tensor made here is made on the engine's
device (``cuda:N`` under NCCL, ``cpu`` under gloo) and read back to Python only after the
collective. Object collectives (``all_gather_object``) pick their device from the process group
themselves.
"""

from __future__ import annotations

from typing import Any


class Collectives:
    """Sums and gathers across the ranks of one stage; at world size 1 nothing is communicated."""

    def __init__(self, world: int, device: Any):
        self.world = world
        self.device = device

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of every rank's ``values`` (float64, so row counts stay exact)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (small, JSON-like), in rank order."""
        import torch.distributed as dist

        if self.world == 1:
            return [obj]
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts
