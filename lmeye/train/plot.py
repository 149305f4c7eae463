"""The loss curve of a stage, from its metrics.jsonl (matplotlib, no display needed; any fsspec path)."""

from __future__ import annotations

import io
import json

from lmeye.train.storage import read_text, write_bytes


def read_metrics(path: str) -> list[dict]:
    return [json.loads(line) for line in (read_text(path) or "").splitlines() if line.strip()]


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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_bytes(png_path, png.getvalue())
    return True
