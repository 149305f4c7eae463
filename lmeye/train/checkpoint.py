"""What a training checkpoint holds, and how a resumed worker reads it back.

One checkpoint is one folder that every rank writes into (Ray Train merges the ranks' files,
whose names never collide) and reports with ``ray.train.report``. Each rank writes its part into a
local temporary folder (DeepSpeed's ``save_checkpoint`` writes to a local disk), which Ray Train
uploads to the run's storage (``train.output``, through fsspec: ``lmeye.train.storage.ray_storage``)
and, on resume, downloads again (``Checkpoint.as_directory``):

* ``model/``: the IPN model directory (``save_pretrained``: safetensors + JSON), rank 0;
* ``deepspeed/``: ``engine.save_checkpoint``: each rank's optimizer partition, the LR scheduler
  and DeepSpeed's step counters (frozen LLM/CLIP weights are left out);
* ``state.json``: stage, epoch, optimizer step, rows trained and skipped so far, world size;
* ``seen/rank{r}.npy``: the ``sample_id`` (as uint64) of every row rank ``r`` pulled in the
  current epoch. This is the *data position*: DeepSpeed's checkpoint has none, and a count of
  batches would only be right if the split across workers came out the same again. With the
  ids, a resumed run skips exactly the rows trained before, whatever the split; with
  ``train.deterministic`` the split does come out the same, so the resumed run continues with
  the very batches the killed run would have used. 8 bytes a row of the epoch.
* ``rng/rank{r}.json``: Python, NumPy and torch RNG states.

Loading never unpickles: JSON, ``.npy`` with ``allow_pickle=False``, safetensors through the
model factory, and DeepSpeed's ``.pt`` files through ``torch.load(weights_only=True)`` (see
``SafeCheckpointEngine``).
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

DS_DIR = "deepspeed"
DS_TAG = "state"
MODEL_DIR = "model"
ATTEMPTS = "attempts.jsonl"  # beside a stage's metrics.jsonl: one line per start of its worker group
STATE = "state.json"


@dataclass
class TrainState:
    stage: str
    epoch: int = 0
    step: int = 0  # optimizer steps done in this stage
    rows: int = 0  # rows trained (all ranks)
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows (all ranks)
    world_size: int = 1
    done: bool = False  # the stage finished (the final checkpoint)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)


class Checkpointer:
    """Writes this rank's part of each checkpoint (see module doc) and reads the latest back on resume.

    ``engine``: a ``lmeye.train.engine.Engine``; ``ipn``: the model it trains (rank 0 writes its
    model directory)."""

    def __init__(self, engine: Any, ipn: Any, rank: int, world: int, zero_stage: int):
        self.engine = engine
        self.ipn = ipn
        self.rank = rank
        self.world = world
        self.zero_stage = zero_stage

    def save(self, state: TrainState, seen: np.ndarray, metrics: dict[str, Any]) -> None:
        """One checkpoint of every rank, reported to Ray Train with ``metrics``."""
        import ray.train
        import torch.distributed as dist
        from ray.train import Checkpoint

        tmp = tempfile.mkdtemp(prefix="lingcloud-ckpt-")
        try:
            self.engine.ds.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=True)
            save_rank_files(tmp, self.rank, seen)
            self.save_model(os.path.join(tmp, MODEL_DIR))
            if self.rank == 0:
                with open(os.path.join(tmp, STATE), "w") as f:
                    f.write(state.to_json())
            if self.world > 1:
                dist.barrier()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def save_model(self, directory: str) -> None:
        """Rank 0 writes the model directory. Under ZeRO-3 every rank first gathers every weight the
        directory holds: the IPN's own, frozen in this stage or not (not only the stage's trainable
        ones, or the frozen ones would be written with shape [0] and the next stage could not load them)."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.ipn.own_parameters().values()), modifier_rank=None):
                if self.rank == 0:
                    self.ipn.save_pretrained(directory)
        elif self.rank == 0:
            self.ipn.save_pretrained(directory)

    def restore(self) -> Optional[tuple[TrainState, np.ndarray]]:
        """Ray Train's latest checkpoint, if there is one, loaded into the engine and this rank's RNGs:
        its state and the ids every rank had pulled in its epoch."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            state = load_state(d)
            self.engine.ds.load_checkpoint(
                os.path.join(d, DS_DIR), tag=DS_TAG, load_module_strict=False,
                load_optimizer_states=True, load_lr_scheduler_states=True,
            )
            seen = load_seen(d)
            restore_rng(d, self.rank)
        state.world_size = self.world
        return state, seen


def save_rank_files(directory: str, rank: int, seen: np.ndarray) -> None:
    """This rank's data position and RNG states."""
    import torch

    os.makedirs(os.path.join(directory, "seen"), exist_ok=True)
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    np.save(os.path.join(directory, "seen", f"rank{rank}.npy"), seen.astype(np.uint64))
    np_state = np.random.get_state()
    py_state = random.getstate()
    rng = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    with open(os.path.join(directory, "rng", f"rank{rank}.json"), "w") as f:
        json.dump(rng, f)


def load_state(directory: str) -> TrainState:
    with open(os.path.join(directory, STATE)) as f:
        return TrainState(**json.load(f))


def load_seen(directory: str) -> np.ndarray:
    """The union of every rank's seen ids (the split may have changed; see module doc)."""
    parts = [np.load(p, allow_pickle=False) for p in sorted(glob.glob(os.path.join(directory, "seen", "rank*.npy")))]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)


def restore_rng(directory: str, rank: int) -> None:
    import torch

    path = os.path.join(directory, "rng", f"rank{rank}.json")
    if not os.path.exists(path):  # a different world size: keep this rank's fresh seeds
        return
    with open(path) as f:
        rng = json.load(f)
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = rng["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def safe_checkpoint_engine(base: Any) -> Any:
    """DeepSpeed's torch checkpoint engine with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19 loads its ``.pt`` files with ``weights_only=False`` (full unpickling). Its
    files hold tensors, plain containers and a few DeepSpeed/torch types, which we allow by name.
    """
    import torch

    class SafeCheckpointEngine(type(base)):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals(_allowed_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    base.__class__ = SafeCheckpointEngine
    return base


def _allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed writes into its checkpoint files (found by loading them)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]
