"""What a stage records as it trains: a line per optimizer step in ``metrics.jsonl`` and a line per
start of the worker group in ``attempts.jsonl`` (rank 0 writes both), and every ``log_every`` steps
a report to Ray Train with a progress line."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from lmeye.train.checkpoint import ATTEMPTS, TrainState


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

    def begin(self) -> None:
        """Training starts: the first window's clock starts here, not at start-up."""
        self.window_start = time.time()

    def log_start(self, nodes: list[str], resumed_step: Any) -> None:
        """Every start of the worker group (the first, a `resume: latest` rerun, Ray Train's restart
        after a lost worker) is one line of ``attempts.jsonl``: the ranks' Ray nodes and the step it
        resumed at (null: from scratch)."""
        if self.rank == 0:
            append_jsonl(os.path.join(os.path.dirname(self.metrics_path), ATTEMPTS),
                         {"time": round(time.time(), 3), "nodes": nodes, "resumed_step": resumed_step})

    def step(self, state: TrainState, loss_rows: float, rows: int, tokens: int, lr: float, seconds: float) -> None:
        """Record the optimizer step ``state.step`` (sums over the ranks); report every ``log_every`` steps."""
        seconds = max(seconds, 1e-9)
        self.last = {
            "stage": self.stage, "step": state.step, "epoch": state.epoch,
            "loss": loss_rows / rows if rows else None, "lr": lr,
            "rows": rows, "samples_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
        }
        if self.rank == 0:
            append_jsonl(self.metrics_path, self.last)
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


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
