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

``Worker`` holds one rank's parts, each in a module of its own: the DeepSpeed engine and its
micro-step (``lmeye.train.engine``), the data feed (``lmeye.train.feed``), the collectives
(``lmeye.train.collectives``), checkpoints (``lmeye.train.checkpoint``), metrics
(``lmeye.train.metrics``) and validation (``lmeye.train.evaluate``); it runs the epochs and steps.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import numpy as np

from lmeye.train.checkpoint import Checkpointer, TrainState
from lmeye.train.collectives import Collectives
from lmeye.train.data import SeenSet
from lmeye.train.engine import Engine
from lmeye.train.evaluate import validate
from lmeye.train.feed import SKIP_REASONS, Feed, group_by_length
from lmeye.train.metrics import Metrics
from lmeye.train.model_factory import in_training_dtype, training_dtype


class Worker:
    """One rank's stage (see module doc): its parts, and the steps and epochs that use them."""

    def __init__(self, *, tc: Any, stage: Any, rank: int, world: int, ipn: Any, maker: Any, engine: Engine,
                 comm: Collectives, feed: Feed, checkpoints: Checkpointer, metrics: Metrics, lockstep: bool):
        self.tc = tc
        self.stage = stage
        self.rank = rank
        self.world = world
        self.ipn = ipn
        self.maker = maker
        self.engine = engine
        self.comm = comm
        self.feed = feed
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.lockstep = lockstep
        self.state = TrainState(stage=stage.name, world_size=world)
        self.nodes: list[str] = []  # each rank's Ray node, in rank order (log_start)
        self.train_seconds = 0.0  # training alone: no start-up, no validation

    @classmethod
    def start(cls, config: dict[str, Any]) -> "Worker":
        """This rank's worker from the loop's ``config`` (see module doc): seeds, the feature store,
        the IPN (fresh or ``init_from``) with the stage's parameters trainable, and the engine."""
        import ray.train
        import torch

        from lmeye.config import Config
        from lmeye.config.train import TrainStage
        from lmeye.store import FeatureStore
        from lmeye.train.data import BatchMaker

        cfg = Config.model_validate(config["cfg"])
        tc = cfg.train
        stage = TrainStage.model_validate(config["stage"])
        factory = config["factory"]
        total_steps = int(config["total_steps"])
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        store = FeatureStore.open(config["features"], version=config["features_version"])
        # the frozen LLM is loaded once, directly in the training dtype (lmeye.train.model_factory.training_dtype)
        ipn = (factory.load(config["init_dir"], dtype=training_dtype(cfg)) if config.get("init_dir")
               else factory.build(in_training_dtype(cfg), store.dim, store.patch_shape))
        ipn.set_trainable(stage.trainable, train_visual_mapping=stage.train_visual_mapping)
        if tc.activation_checkpointing:  # the frozen LLM's activations are recomputed, not kept (lmeye.model.recompute)
            ipn.recompute_activations()
        ipn.features_table = config["features"]  # saved in the model's JSON: chat and eval encode images with it
        params = [p for p in ipn.trainable_parameters() if p.requires_grad]
        # ZeRO-3 gathers each module's weights collectively as it runs: every rank runs the same modules
        lockstep = tc.zero_stage == 3 and world > 1
        maker = BatchMaker(ipn, store, on_missing=tc.on_missing_features, on_too_long=tc.on_too_long, lockstep=lockstep)
        engine = Engine.initialize(ipn, params, maker, tc, stage, world, total_steps, lockstep)
        return cls(
            tc=tc, stage=stage, rank=rank, world=world, ipn=ipn, maker=maker, engine=engine,
            comm=Collectives(world, engine.device), feed=Feed(maker, tc.use_gpu),
            checkpoints=Checkpointer(engine, ipn, rank, world, tc.zero_stage),
            metrics=Metrics(stage.name, rank, config["metrics_path"], total_steps, tc.log_every, tc.checkpoint_every),
            lockstep=lockstep,
        )

    # ------------------------------------------------------------------ start
    def resume(self) -> bool:
        """Continue from Ray Train's latest checkpoint, if there is one; True when resumed."""
        restored = self.checkpoints.restore()
        if restored is None:
            return False
        self.state, seen = restored
        self.feed = Feed(self.maker, self.tc.use_gpu, SeenSet(seen))
        if self.rank == 0:
            print(f"[train {self.stage.name}] resumed at epoch {self.state.epoch} step {self.state.step} "
                  f"({self.feed.seen_prev.size} rows of this epoch already seen)", flush=True)
        return True

    def log_start(self, resumed: bool) -> None:
        """One line of ``attempts.jsonl`` for this start of the worker group (``Metrics.log_start``)."""
        import ray

        self.nodes = self.comm.gather(ray.get_runtime_context().get_node_id())
        self.metrics.log_start(self.nodes, self.state.step if resumed else None)

    # ------------------------------------------------------------------ training
    def train(self) -> None:
        import ray.train

        tc, st = self.tc, self.stage
        shard = ray.train.get_dataset_shard("train")
        max_steps = st.max_steps or float("inf")
        started = time.time()
        self.metrics.begin()
        while self.state.epoch < st.epochs and self.state.step < max_steps:
            seed = tc.seed + self.state.epoch
            group = tc.group_by_length
            tables = shard.iter_batches(
                batch_size=self.engine.micro * group, batch_format="pyarrow", prefetch_batches=1,
                local_shuffle_buffer_size=tc.shuffle_buffer or None,
                local_shuffle_seed=seed if tc.shuffle_buffer else None,
            )
            batches = self.feed.prepared(group_by_length(tables, self.engine.micro, seed) if group > 1 else tables)
            mine_done = ended = False
            while self.state.step < max_steps:
                t0 = time.time()
                acc = [0.0, 0, 0]  # loss*rows, rows, tokens of this rank in this step
                for k in range(self.engine.accum):
                    prep = None if mine_done else self.feed.next_batch(batches)
                    mine_done = prep is None
                    alive = self.comm.sum([0.0 if mine_done else 1.0])[0]
                    if alive == 0 and k == 0:
                        ended = True  # no rank has data left: the epoch is over
                        break
                    # alive == 0 later in the step: zero-loss micro-steps complete the accumulation
                    loss_rows, rows, tokens = self.engine.micro_step(prep)
                    acc = [acc[0] + loss_rows, acc[1] + rows, acc[2] + tokens]
                if ended:
                    break
                self._end_step(acc, t0)
                if self.state.step % tc.checkpoint_every == 0:
                    self.checkpoint()
            if not ended:
                break  # max_steps inside the epoch: the epoch is not finished
            self.state.epoch += 1
            self.feed.new_epoch()
        self.train_seconds = time.time() - started

    def _end_step(self, acc: list[float], t0: float) -> None:
        """Sum the step's counts over the ranks into the state and record its metrics."""
        loss_rows, rows, tokens, *skips = self.comm.sum([acc[0], acc[1], acc[2], *self.feed.take_skips()])
        self.state.step += 1
        self.state.rows += int(rows)
        self.state.tokens += int(tokens)
        for reason, n in zip(SKIP_REASONS, skips):
            if n:
                self.state.skipped[reason] = self.state.skipped.get(reason, 0) + int(n)
        self.metrics.step(self.state, loss_rows, int(rows), int(tokens), self.engine.lr, time.time() - t0)

    def checkpoint(self, **extra: Any) -> None:
        self.metrics.flush()
        self.checkpoints.save(self.state, self.feed.seen(with_resumed=self.rank == 0),
                              dict(self.metrics.last, step=self.state.step, **extra))

    # ------------------------------------------------------------------ end
    def validate(self) -> dict[str, Any]:
        return validate(self.engine.ds, self.ipn, self.maker, self.engine.micro, self.engine.device, self.tc, self.comm,
                        self.lockstep)

    def finish(self, val: dict[str, Any]) -> None:
        self.state.done = True
        self.checkpoint(final=True, train_seconds=self.train_seconds, rows=self.state.rows,
                        skipped=json.dumps(self.state.skipped), worker_nodes=json.dumps(self.nodes), **val)


def train_loop(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the stage's ``TorchTrainer``."""
    w = Worker.start(config)
    w.log_start(w.resume())
    if not w.state.done:
        w.train()
        w.finish(w.validate())
