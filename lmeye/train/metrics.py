"""What a stage records as it trains: a line per optimizer step in ``metrics.jsonl`` and a line per
start of the worker group in ``attempts.jsonl`` (rank 0 writes both, through fsspec into the run's
output wherever rank 0 runs: ``lmeye.train.storage.JsonLines``), and every ``log_every`` steps a
report to Ray Train with a progress line."""

from __future__ import annotations

import posixpath
import time
from typing import Any, Optional

from lmeye.train.checkpoint import ATTEMPTS, TrainState
from lmeye.train.storage import JsonLines


class Metrics:
    """One rank's step metrics; only rank 0 writes files and prints."""

    def __init__(self, stage: str, rank: int, metrics_path: str, total_steps: int, log_every: int, checkpoint_every: int):
        self.stage = stage
        self.rank = rank
        self.metrics_path = metrics_path
        self.total_steps = total_steps
        self.log_every = log_every
        self.checkpoint_every = checkpoint_every
        self.last: dict[str, Any] = {}  # the last step's metrics (all ranks summed)
        self.window_rows = 0  # rows and tokens since the last report
        self.window_tokens = 0
        self.window_start = time.time()
        self.steps: Optional[JsonLines] = None  # metrics.jsonl, rank 0's, from log_start on

    def begin(self) -> None:
        """Training starts: the first window's clock starts here, not at start-up."""
        self.window_start = time.time()

    def log_start(self, nodes: list[str], resumed_step: Optional[int]) -> None:
        """Every start of the worker group (the first, a `resume: latest` rerun, Ray Train's restart
        after a lost worker) is one line of ``attempts.jsonl``: the ranks' Ray nodes and the step it
        resumed at (None: from scratch). ``metrics.jsonl`` keeps the lines of the steps up to that
        one: the steps after the checkpoint are trained again and get their lines again."""
        if self.rank != 0:
            return
        attempts = JsonLines(posixpath.join(posixpath.dirname(self.metrics_path), ATTEMPTS))
        attempts.append({"time": round(time.time(), 3), "nodes": nodes, "resumed_step": resumed_step})
        attempts.flush(force=True)
        self.steps = JsonLines(self.metrics_path, keep=lambda r: resumed_step is not None and r.get("step", 0) <= resumed_step)

    def step(self, state: TrainState, loss_rows: float, rows: int, tokens: int, lr: float, seconds: float) -> None:
        """Record the optimizer step ``state.step`` (sums over the ranks); report every ``log_every`` steps."""
        seconds = max(seconds, 1e-9)
        self.last = {
            "stage": self.stage, "step": state.step, "epoch": state.epoch,
            "loss": loss_rows / rows if rows else None, "lr": lr,
            "rows": rows, "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
        }
        if self.steps is not None:
            self.steps.append(self.last)
            self.steps.flush()
        self.window_rows += rows
        self.window_tokens += tokens
        if state.step % self.log_every == 0:
            self._report(state)

    def _report(self, state: TrainState) -> None:
        import ray.train

        seconds = max(time.time() - self.window_start, 1e-9)
        rate = self.window_rows / seconds
        metrics = dict(self.last, window_samples_per_s=rate, window_tokens_per_s=self.window_tokens / seconds)
        if self.rank == 0:
            loss = f"{self.last['loss']:.4f}" if self.last["loss"] is not None else "-"
            total = f"/{self.total_steps}" if self.total_steps else ""
            print(f"[train {self.stage}] step {state.step}{total}  epoch {state.epoch}  loss {loss}  "
                  f"lr {self.last['lr']:.2e}  {rate:.1f} samples/s  {metrics['window_tokens_per_s']:.0f} tokens/s", flush=True)
        if state.step % self.checkpoint_every != 0:  # a checkpoint step reports with its checkpoint
            ray.train.report(metrics)
        self.window_rows = self.window_tokens = 0
        self.window_start = time.time()

    def flush(self) -> None:
        """Every step's line into the run's output now (at a checkpoint and at the end)."""
        if self.steps is not None:
            self.steps.flush(force=True)
