"""One entry point over the three benchmarks, for the command and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmeye.eval.common import Answerer


def evaluate(
    benchmark: str, answerer: Answerer, data: str | Path, out: str | Path, limit: int | None = None,
    image_dir: str | Path | None = None, batch_size: int = 1,
) -> dict[str, Any]:
    """Run one benchmark ("mme", "mmbench", "seedbench"), ``batch_size`` questions per model call;
    returns its result (also written under ``out``, with the per-question records it resumes from)."""
    if benchmark == "mme":
        from lmeye.eval.mme import evaluate_mme

        return evaluate_mme(answerer, data, out, limit, batch_size)
    if benchmark == "mmbench":
        from lmeye.eval.mmbench import evaluate_mmbench

        return evaluate_mmbench(answerer, data, out, limit, batch_size)
    if benchmark == "seedbench":
        from lmeye.eval.seedbench import evaluate_seedbench

        return evaluate_seedbench(answerer, data, out, limit, image_dir, batch_size)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected mme, mmbench or seedbench")


def evaluate_all(answerer: Answerer, data: dict[str, str | Path], out: str | Path, batch_size: int = 1) -> dict[str, dict[str, Any]]:
    """``data``: benchmark -> its data path (e.g. ``dataclasses.asdict`` of demo ``BenchSets``)."""
    return {name: evaluate(name, answerer, path, out, batch_size=batch_size) for name, path in data.items()}
