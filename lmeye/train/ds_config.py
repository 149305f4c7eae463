"""The DeepSpeed config dict of one stage, built from the ``train`` section, and its LR schedule.

The schedule is ours (a ``LambdaLR`` handed to ``deepspeed.initialize``), not one of DeepSpeed's:
theirs force at least two warm-up steps and start at LR 0; ours is exactly ``warmup_steps`` of
linear warm-up (none when 0), then constant, linear or cosine decay to 0 at the last step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from lmeye.config.train import TrainConfig, TrainStage


def stage_value(tc: TrainConfig, stage: TrainStage, key: str) -> Any:
    """A stage's own value of ``key``, else the section's."""
    value = getattr(stage, key)
    return getattr(tc, key) if value is None else value


def deepspeed_config(tc: TrainConfig, stage: TrainStage, world_size: int, total_steps: int) -> dict[str, Any]:
    micro = stage_value(tc, stage, "micro_batch_size")
    accum = stage_value(tc, stage, "grad_accum")
    lr = stage_value(tc, stage, "lr")
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": tc.grad_clip,
        "steps_per_print": 10**9,  # our own progress line says it once
        "wall_clock_breakdown": False,
        # torch's AdamW, not DeepSpeed's fused one: no JIT build (~35 s on CPU), same update.
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": tc.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.precision == "bf16"},
        "fp16": {"enabled": tc.precision == "fp16"},
    }
    if tc.zero_stage == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        if tc.zero3_param_persistence_threshold is not None:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = tc.zero3_param_persistence_threshold
    return cfg


def lr_factor(schedule: str, warmup: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR for optimizer step ``s`` (0 = the first step)."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        p = min(1.0, (s - warmup) / max(1, total_steps - warmup))
        return 1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))

    return factor


def scheduler_fn(tc: TrainConfig, stage: TrainStage, total_steps: int) -> Callable[[Any], Any]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer it built."""
    warmup = stage_value(tc, stage, "warmup_steps")
    schedule = tc.schedule

    def make(optimizer: Any) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, lr_factor(schedule, warmup, total_steps))

    return make
