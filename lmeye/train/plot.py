"""The loss curve of a stage, from its metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(metrics_path: str, png_path: str, title: str = "") -> bool:
    """Write ``png_path``; False when there is nothing to plot. A resumed run's steps overwrite the
    killed run's records of the same step (the last record of a step wins)."""
    by_step: dict[int, float] = {}
    for rec in read_metrics(metrics_path):
        if rec.get("loss") is not None:
            by_step[int(rec["step"])] = float(rec["loss"])
    if not by_step:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [by_step[s] for s in steps], linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
