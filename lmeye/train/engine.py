"""One rank's DeepSpeed engine for a stage, and its micro-step.

The engine is built with the stage's trainable IPN parameters only (the frozen LLM and CLIP never
enter the optimizer). A micro-step is forward, backward and ``engine.step()`` (DeepSpeed applies
the optimizer at the end of each accumulation). A rank without data still steps, with a zero loss,
so every rank makes the same collective calls inside DeepSpeed.
"""

from __future__ import annotations

from typing import Any, Optional

from lmeye.train.data import llm_tokens, to_device


class Engine:
    """The DeepSpeed engine (``ds``), its LR scheduler and how a micro-step runs on this rank.

    ``lockstep`` (ZeRO-3 with several ranks): every rank runs the forward, a rank without data on the
    maker's filler row with its loss times 0, because ZeRO-3 gathers each module's weights
    collectively as it runs."""

    def __init__(self, ds: Any, scheduler: Any, params: list[Any], maker: Any, *, device: Any, precision: str,
                 lockstep: bool, accum: int, micro: int):
        self.ds = ds
        self.scheduler = scheduler
        self.params = params
        self.maker = maker
        self.device = device
        self.precision = precision
        self.lockstep = lockstep
        self.accum = accum  # micro-steps per optimizer step
        self.micro = micro  # rows per micro-batch

    @classmethod
    def initialize(cls, ipn: Any, params: list[Any], maker: Any, tc: Any, stage: Any, world: int, total_steps: int,
                   lockstep: bool) -> "Engine":
        """``deepspeed.initialize`` with the stage's config and LR schedule (``lmeye.train.ds_config``)."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from lmeye.train.checkpoint import safe_checkpoint_engine
        from lmeye.train.ds_config import deepspeed_config, scheduler_fn

        skip_shm_comm_op()
        ds_cfg = deepspeed_config(tc, stage, world, total_steps)
        ds, _, _, scheduler = deepspeed.initialize(
            model=ipn, model_parameters=params, config=ds_cfg, lr_scheduler=scheduler_fn(tc, stage, total_steps),
        )
        safe_checkpoint_engine(ds.checkpoint_engine)
        return cls(ds, scheduler, params, maker, device=get_accelerator().device_name(ds.local_rank),
                   precision=tc.precision, lockstep=lockstep, accum=ds_cfg["gradient_accumulation_steps"],
                   micro=ds_cfg["train_micro_batch_size_per_gpu"])

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def micro_step(self, prep: Optional[Any]) -> tuple[float, int, int]:
        """One micro-step on ``prep`` (a ``lmeye.train.data.Prepared``; None: this rank has no data).
        Returns (loss x rows, rows, LLM tokens) of this rank."""
        batch = prep.batch if prep is not None else None
        if self.lockstep:  # every rank runs the forward (a filler row without data); every part runs, so every weight has a gradient
            out = self.ds(to_device(batch if batch is not None else self.maker.filler(), self.device, self.precision))
            loss, value = (out.loss, float(out.loss.detach().float())) if batch is not None else (out.loss * 0.0, 0.0)
        else:
            zero = sum(p.sum() for p in self.params) * 0.0  # every trainable parameter in every rank's graph
            if batch is not None:
                out = self.ds(to_device(batch, self.device, self.precision))
                loss = out.loss + zero
                value = float(out.loss.detach().float())
            else:
                loss, value = zero, 0.0
        self.ds.backward(loss)
        self.ds.step()
        rows = prep.rows if prep is not None else 0
        return value * rows, rows, llm_tokens(batch)


def skip_shm_comm_op() -> None:
    """Tell DeepSpeed its shared-memory all-reduce op is unavailable instead of letting it build it.

    On a CPU accelerator DeepSpeed JIT-compiles that op with g++ when its comm backend starts (about a
    minute on 2 cores, once per venv, in every rank at once), yet only ``inference_all_reduce`` uses it:
    training's collectives go through torch.distributed. Other accelerators never build it.
    """
    import deepspeed.ops

    ops = deepspeed.ops.__dict__.get("__compatible_ops__")
    if ops is None:  # not probed yet: no probe at all (it runs compilers); the comm backend reads only this key
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    else:
        ops["deepspeed_shm_comm"] = False
