"""The worker loop's collectives stay on the engine's device, as NCCL requires.

NCCL has no CPU backend: a tensor handed to it off the GPU raises. On a CPU-only machine the engine's
device is the CPU, so the test turns the situation around: tensors made without a device land on the
default device, set here to ``meta`` (on a GPU worker: the CPU), and the process group, like NCCL,
refuses every tensor that is not on the engine's device (here: the CPU). Two ranks are simulated by
a group whose every peer holds the same values, so each sum is twice this rank's.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmeye.config import load_config
from lmeye.train.collectives import Collectives
from lmeye.train.engine import Engine
from lmeye.train.feed import Feed
from lmeye.train.loop import Worker
from lmeye.train.metrics import Metrics

ENGINE_DEVICE = "cpu"


class RefusingGroup:
    """A 2-rank process group that, like NCCL, takes only tensors on the engine's device."""

    def __init__(self):
        self.calls = 0

    def all_reduce(self, t, *args, **kwargs):
        if t.device != torch.device(ENGINE_DEVICE):
            raise RuntimeError(f"no backend for device {t.device} (the group serves {ENGINE_DEVICE} only)")
        self.calls += 1
        t.mul_(2)  # the other rank holds the same values

    def all_gather_object(self, parts, obj, *args, **kwargs):
        parts[:] = [obj] * len(parts)


@pytest.fixture
def group(monkeypatch):
    import torch.distributed as dist

    g = RefusingGroup()
    monkeypatch.setattr(dist, "all_reduce", g.all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", g.all_gather_object)
    return g


class FakeDeepSpeed:
    """One trainable weight; the loss of a batch is w * sum(x)."""

    def __init__(self, w):
        self.w = w
        self.steps = 0

    def __call__(self, batch):
        loss = self.w * batch["x"].sum()
        return SimpleNamespace(loss=loss)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1


class Shard:
    def __init__(self, n_batches):
        self.n = n_batches

    def iter_batches(self, **kwargs):
        return iter(range(self.n))


class Maker:
    def prepare(self, table, seen):
        x = torch.ones(2, device="cpu")  # the host's batch, as BatchMaker makes it
        return SimpleNamespace(batch={"x": x, "attention_mask": torch.ones(2, 3, dtype=torch.long, device="cpu")},
                               rows=2, seen=np.array([table], np.uint64), skipped=Counter())


def _worker(tmp_path, n_batches):
    cfg = load_config(None, {"train.log_every": 10**6, "train.checkpoint_every": 10**6, "train.precision": "fp32",
                             "train.shuffle_buffer": 0})
    w = torch.nn.Parameter(torch.ones((), device="cpu"))
    maker = Maker()
    engine = Engine(FakeDeepSpeed(w), SimpleNamespace(get_last_lr=lambda: [0.1]), [w], maker, device=ENGINE_DEVICE,
                    precision="fp32", lockstep=False, accum=2, micro=2)
    return Worker(tc=cfg.train, stage=cfg.train.stages[0], rank=0, world=2, ipn=None, maker=maker, engine=engine,
                  comm=Collectives(2, ENGINE_DEVICE), feed=Feed(maker, use_gpu=False), checkpoints=None,
                  metrics=Metrics("s", 0, str(tmp_path / "metrics.jsonl"), 0, 10**6, 10**6), lockstep=False)


def test_the_worker_loop_runs_on_a_group_that_refuses_tensors_off_the_engines_device(tmp_path, group, monkeypatch):
    import ray.train

    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard(4))
    worker = _worker(tmp_path, 4)
    with torch.device("meta"):  # where a tensor made without a device lands: not the engine's device
        worker.train()
    # 4 micro-batches, 2 per step: 2 steps, each summing 2 rows x 2 micro-batches x 2 ranks
    assert worker.state.step == 2 and worker.state.rows == 16 and worker.engine.ds.steps == 4
    assert group.calls == 2 * 2 + 1 + 2  # "alive" before each micro-step and the end check, a sum per step


def test_collectives_sum_exactly_and_gather_in_rank_order(group):
    comm = Collectives(2, ENGINE_DEVICE)
    with torch.device("meta"):
        assert comm.sum([1.0, 2**40 + 1.0]) == [2.0, 2**41 + 2.0]
    assert comm.gather({"a": 1}) == [{"a": 1}, {"a": 1}]
    assert Collectives(1, ENGINE_DEVICE).gather("x") == ["x"] and group.calls == 1
