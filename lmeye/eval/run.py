"""One entry point over the three benchmarks, for the command and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmeye.eval.common import Answerer


def evaluate(
    benchmark: str, answerer: Answerer, data: str | Path, out: str | Path, limit: int | None = None, image_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run one benchmark ("mme", "mmbench", "seedbench"); returns its result (also written under ``out``)."""
    if benchmark == "mme":
        from lmeye.eval.mme import evaluate_mme

        return evaluate_mme(answerer, data, out, limit)
    if benchmark == "mmbench":
        from lmeye.eval.mmbench import evaluate_mmbench

        return evaluate_mmbench(answerer, data, out, limit)
    if benchmark == "seedbench":
        from lmeye.eval.seedbench import evaluate_seedbench

        return evaluate_seedbench(answerer, data, out, limit, image_dir)
    raise ValueError(f"unknown benchmark {benchmark!r}; expected mme, mmbench or seedbench")


def evaluate_all(answerer: Answerer, data: dict[str, str | Path], out: str | Path) -> dict[str, dict[str, Any]]:
    """``data``: benchmark -> its data path (e.g. ``dataclasses.asdict`` of demo ``BenchSets``)."""
    return {name: evaluate(name, answerer, path, out) for name, path in data.items()}
