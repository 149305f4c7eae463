"""The loop each Ray Train worker runs for one stage: DeepSpeed inside Ray Train.

``train_loop(config)`` is handed to ``TorchTrainer``; ``config`` carries the validated config
(as JSON), the stage, the model factory, the features table and its version, and the step
count of the schedule. On each worker:

1. build the IPN through the factory (fresh, or loaded from ``init_from``), make the stage's
   parameters trainable, and ``deepspeed.initialize`` with only those in the optimizer (the
   frozen LLM and CLIP never enter it);
2. resume from ``ray.train.get_checkpoint()`` when Ray Train has one (a rerun with the same
   run name, or a restart after a worker failure): DeepSpeed's state, the step, the rows seen
   in this epoch and the RNGs (``lmeye.train.checkpoint``);
3. stream this worker's shard of the `instructions` rows (``get_dataset_shard("train")``),
   turn each Arrow batch into a model batch (``lmeye.train.data``) and step. Shards may hold
   different row counts, and rows may be skipped: before every micro-step the ranks agree
   whether any of them still has data, and a rank that has none steps with a zero loss, so
   every rank makes the same collective calls and every row is trained exactly once;
4. every ``checkpoint_every`` steps and at the end, checkpoint; every ``log_every`` steps,
   report metrics and print a progress line (rank 0 also appends every step to metrics.jsonl);
5. at the end, validation loss and exact-match accuracy on the ``validation`` shard.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from typing import Any, Optional

import numpy as np

from lmeye.train.checkpoint import (
    ATTEMPTS,
    DS_DIR,
    DS_TAG,
    MODEL_DIR,
    STATE,
    TrainState,
    load_seen,
    load_state,
    restore_rng,
    safe_checkpoint_engine,
    save_rank_files,
)
from lmeye.train.collectives import Collectives
from lmeye.train.data import SeenSet, llm_tokens, to_device
from lmeye.train.model_factory import in_training_dtype, training_dtype

class Worker:
    """State of one rank for one stage (see module doc)."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import torch

        from lmeye.config import Config
        from lmeye.config.train import TrainStage
        from lmeye.store import FeatureStore
        from lmeye.train.data import BatchMaker

        self.cfg = Config.model_validate(config["cfg"])
        self.tc = self.cfg.train
        self.stage = TrainStage.model_validate(config["stage"])
        self.factory = config["factory"]
        self.total_steps = int(config["total_steps"])
        self.metrics_path = config["metrics_path"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        random.seed(self.tc.seed)
        np.random.seed(self.tc.seed)
        torch.manual_seed(self.tc.seed)
        self.store = FeatureStore.open(config["features"], version=config["features_version"])
        # the frozen LLM is loaded once, directly in the training dtype (lmeye.train.model_factory.training_dtype)
        ipn = (self.factory.load(config["init_dir"], dtype=training_dtype(self.cfg)) if config.get("init_dir")
               else self.factory.build(in_training_dtype(self.cfg), self.store.dim, self.store.patch_shape))
        ipn.set_trainable(self.stage.trainable, train_visual_mapping=self.stage.train_visual_mapping)
        ipn.features_table = config["features"]  # saved in the model's JSON: chat and eval encode images with it
        self.ipn = ipn
        self.params = [p for p in ipn.trainable_parameters() if p.requires_grad]
        # ZeRO-3 gathers each module's weights collectively as it runs: every rank runs the same modules
        self.lockstep = self.tc.zero_stage == 3 and self.world > 1
        self.maker = BatchMaker(ipn, self.store, on_missing=self.tc.on_missing_features, on_too_long=self.tc.on_too_long,
                                lockstep=self.lockstep)
        self._init_engine(config)
        self.state = TrainState(stage=self.stage.name, world_size=self.world)
        self.seen_prev = SeenSet()  # rows of this epoch trained before the resume
        self.seen_new: list[np.ndarray] = []

    def _init_engine(self, config: dict[str, Any]) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from lmeye.train.ds_config import deepspeed_config, scheduler_fn

        _skip_shm_comm_op()
        ds_cfg = deepspeed_config(self.tc, self.stage, self.world, self.total_steps)
        self.accum = ds_cfg["gradient_accumulation_steps"]
        self.micro = ds_cfg["train_micro_batch_size_per_gpu"]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.ipn, model_parameters=self.params, config=ds_cfg,
            lr_scheduler=scheduler_fn(self.tc, self.stage, self.total_steps),
        )
        safe_checkpoint_engine(self.engine.checkpoint_engine)
        self.device = get_accelerator().device_name(self.engine.local_rank)
        self.comm = Collectives(self.world, self.device)

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Continue from Ray Train's latest checkpoint, if there is one; True when resumed."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return False
        with ckpt.as_directory() as d:
            state = load_state(d)
            self.engine.load_checkpoint(
                os.path.join(d, DS_DIR), tag=DS_TAG, load_module_strict=False,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
            self.seen_prev = SeenSet(load_seen(d))
            restore_rng(d, self.rank)
        state.world_size = self.world
        self.state = state
        if self.rank == 0:
            print(f"[train {self.stage.name}] resumed at epoch {state.epoch} step {state.step} "
                  f"({self.seen_prev.size} rows of this epoch already seen)", flush=True)
        return True

    def log_start(self, resumed: bool) -> None:
        """Every start of the worker group (the first, a `resume: latest` rerun, Ray Train's restart
        after a lost worker) is one line of ``attempts.jsonl``: the ranks' Ray nodes and the step it
        resumed at (null: from scratch)."""
        import ray

        nodes = self.comm.gather(ray.get_runtime_context().get_node_id())
        self.nodes = nodes
        if self.rank == 0:
            _append_jsonl(os.path.join(os.path.dirname(self.metrics_path), ATTEMPTS),
                          {"time": round(time.time(), 3), "nodes": nodes, "resumed_step": self.state.step if resumed else None})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

        tmp = tempfile.mkdtemp(prefix="lingcloud-ckpt-")
        try:
            self.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
            seen = np.concatenate([self.seen_prev.keys if self.rank == 0 else np.zeros(0, np.uint64), *self.seen_new])
            save_rank_files(tmp, self.rank, seen)
            self.save_model(os.path.join(tmp, MODEL_DIR))
            if self.rank == 0:
                with open(os.path.join(tmp, STATE), "w") as f:
                    f.write(self.state.to_json())
            if self.world > 1:
                dist.barrier()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_model(self, directory: str) -> None:
        """Rank 0 writes the model directory. Under ZeRO-3 every rank first gathers every weight the
        directory holds: the IPN's own, frozen in this stage or not (not only the stage's trainable
        ones, or the frozen ones would be written with shape [0] and the next stage could not load them)."""
        if self.tc.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.ipn.own_parameters().values()), modifier_rank=None):
                if self.rank == 0:
                    self.ipn.save_pretrained(directory)
        elif self.rank == 0:
            self.ipn.save_pretrained(directory)

    # ------------------------------------------------------------------ training
    def _prepared(self, batches: Any) -> Any:
        """``maker.prepare`` of each batch. On GPU workers one batch ahead in a thread, so feature
        reads, tokenisation and collation overlap the step. On CPU workers in line: the step
        computes on the same cores and the thread only fought it for them and for the GIL
        (``benchmarks/train.py``, 2 cores: 985 rows/s with the thread, 1,096 without). Same
        batches, same order either way."""
        it = iter(batches)
        if not self.tc.use_gpu:
            for table in it:
                yield self.maker.prepare(table, self.seen_prev)
            return
        from concurrent.futures import ThreadPoolExecutor

        def prepare_next() -> Optional[Any]:
            table = next(it, None)
            return None if table is None else self.maker.prepare(table, self.seen_prev)

        with ThreadPoolExecutor(1, thread_name_prefix="lingcloud-batches") as pool:
            pending = pool.submit(prepare_next)
            while True:
                prep = pending.result()
                if prep is None:
                    return
                pending = pool.submit(prepare_next)
                yield prep

    def _next_batch(self, prepared: Any) -> Optional[Any]:
        """The next micro-batch with something not yet seen; None when the shard is exhausted."""
        for prep in prepared:
            self._skips.update(prep.skipped)
            if prep.seen.size == 0:
                continue  # every row was trained before the resume
            self.seen_new.append(prep.seen)
            return prep
        return None

    def _micro_step(self, prep: Optional[Any]) -> tuple[float, int, int]:
        batch = prep.batch if prep is not None else None
        if self.lockstep:  # every rank runs the forward (a filler row without data); every part runs, so every weight has a gradient
            out = self.engine(to_device(batch if batch is not None else self.maker.filler(), self.device, self.tc.precision))
            loss, value = (out.loss, float(out.loss.detach().float())) if batch is not None else (out.loss * 0.0, 0.0)
        else:
            zero = sum(p.sum() for p in self.params) * 0.0  # every trainable parameter in every rank's graph
            if batch is not None:
                out = self.engine(to_device(batch, self.device, self.tc.precision))
                loss = out.loss + zero
                value = float(out.loss.detach().float())
            else:
                loss, value = zero, 0.0
        self.engine.backward(loss)
        self.engine.step()
        rows = prep.rows if prep is not None else 0
        return value * rows, rows, llm_tokens(batch)

    def train(self) -> None:
        import ray.train

        tc, st = self.tc, self.stage
        shard = ray.train.get_dataset_shard("train")
        max_steps = st.max_steps or float("inf")
        self._skips: Counter = Counter()
        last_log = self._started = time.time()
        window = [0.0, 0, 0]  # rows and tokens since the last log
        while self.state.epoch < st.epochs and self.state.step < max_steps:
            seed = tc.seed + self.state.epoch
            batches = self._prepared(shard.iter_batches(
                batch_size=self.micro, batch_format="pyarrow", prefetch_batches=1,
                local_shuffle_buffer_size=tc.shuffle_buffer or None,
                local_shuffle_seed=seed if tc.shuffle_buffer else None,
            ))
            mine_done = ended = False
            while self.state.step < max_steps:
                t0 = time.time()
                acc = [0.0, 0, 0]  # loss*rows, rows, tokens of this rank in this step
                for k in range(self.accum):
                    prep = None if mine_done else self._next_batch(batches)
                    mine_done = prep is None
                    alive = self.comm.sum([0.0 if mine_done else 1.0])[0]
                    if alive == 0 and k == 0:
                        ended = True  # no rank has data left: the epoch is over
                        break
                    # alive == 0 later in the step: zero-loss micro-steps complete the accumulation
                    loss_rows, rows, tokens = self._micro_step(prep)
                    acc = [acc[0] + loss_rows, acc[1] + rows, acc[2] + tokens]
                if ended:
                    break
                self._after_step(acc, t0)
                window = [window[0], window[1] + self._last_rows, window[2] + self._last_tokens]
                if self.state.step % tc.log_every == 0:
                    self._report(time.time() - last_log, window)
                    last_log, window = time.time(), [0.0, 0, 0]
                if self.state.step % tc.checkpoint_every == 0:
                    self._checkpoint_now()
            if not ended:
                break  # max_steps inside the epoch: the epoch is not finished
            self.state.epoch += 1
            self.seen_prev, self.seen_new = SeenSet(), []
        self.train_seconds = time.time() - self._started  # training alone: no start-up, no validation

    def _after_step(self, acc: list[float], t0: float) -> None:
        loss_rows, rows, tokens, *skips = self.comm.sum([acc[0], acc[1], acc[2], *self._skip_vector()])
        self._skips.clear()
        self.state.step += 1
        self.state.rows += int(rows)
        self.state.tokens += int(tokens)
        for reason, n in zip(SKIP_REASONS, skips):
            if n:
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + int(n)
        self._last_rows, self._last_tokens = int(rows), int(tokens)
        seconds = max(time.time() - t0, 1e-9)
        self.last = {
            "stage": self.stage.name, "step": self.state.step, "epoch": self.state.epoch,
            "loss": loss_rows / rows if rows else None, "lr": float(self.scheduler.get_last_lr()[0]),
            "rows": int(rows), "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
        }
        if self.rank == 0:
            _append_jsonl(self.metrics_path, self.last)

    def _skip_vector(self) -> list[float]:
        return [float(self._skips.get(r, 0)) for r in SKIP_REASONS]

    def _report(self, seconds: float, window: list[float]) -> None:
        import ray.train

        rate = window[1] / max(seconds, 1e-9)
        metrics = dict(self.last, window_samples_per_s=rate, window_tokens_per_s=window[2] / max(seconds, 1e-9))
        if self.rank == 0:
            loss = f"{self.last['loss']:.4f}" if self.last["loss"] is not None else "-"
            total = f"/{self.total_steps}" if self.total_steps else ""
            print(f"[train {self.stage.name}] step {self.state.step}{total}  epoch {self.state.epoch}  loss {loss}  "
                  f"lr {self.last['lr']:.2e}  {rate:.1f} samples/s  {metrics['window_tokens_per_s']:.0f} tokens/s", flush=True)
        if self.state.step % self.tc.checkpoint_every != 0:  # a checkpoint step reports with its checkpoint
            ray.train.report(metrics)

    def _checkpoint_now(self) -> None:
        self.checkpoint(dict(getattr(self, "last", {}), step=self.state.step))

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, Any]:
        import ray.train

        from lmeye.train.evaluate import evaluate

        try:
            shard = ray.train.get_dataset_shard("validation")
        except KeyError:  # the stage has no validation rows (a small corpus's split can leave none)
            return {}
        local = evaluate(self.engine, self.ipn, self.maker, shard, self.micro, self.device, self.tc,
                         self.comm if self.lockstep else None)
        return _merge_eval(self.comm.gather(local))

    def finish(self, val: dict[str, Any]) -> None:
        self.state.done = True
        self.checkpoint(dict(getattr(self, "last", {}), step=self.state.step, final=True,
                             train_seconds=getattr(self, "train_seconds", 0.0),
                             rows=self.state.rows, skipped=json.dumps(self.state.skipped),
                             worker_nodes=json.dumps(getattr(self, "nodes", [])), **val))


SKIP_REASONS = ("missing_features", "too_long", "resumed_skip")


def _skip_shm_comm_op() -> None:
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


def _merge_eval(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum every rank's validation counts (small dicts, gathered once)."""
    total: dict[str, float] = Counter()
    for p in parts:
        for k, v in p.items():
            total[k] += v
    out: dict[str, Any] = {}
    if total.get("val_loss_rows"):
        out["val_loss"] = total["val_loss_sum"] / total["val_loss_rows"]
    if total.get("val_rows"):
        out["val_exact_match"] = total["val_correct"] / total["val_rows"]
        out["val_rows"] = int(total["val_rows"])
    for k in sorted(total):
        if k.startswith("rows:"):
            task = k[5:]
            out[f"val_exact_match[{task}]"] = total[f"correct:{task}"] / total[k]
    return out


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_loop(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the stage's ``TorchTrainer``."""
    w = Worker(config)
    w.log_start(w.resume())
    if not w.state.done:
        w.train()
        w.finish(w.validate())
