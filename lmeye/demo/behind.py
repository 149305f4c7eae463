"""The demo's own models, built behind the pipeline.

``lmeye demo`` starts the demo LLM's build (about 50 s on one core, needed only by train) in a process
of its own before it writes the corpus, at a lower priority, so its training takes the core the
corpus, Ray's start, download and extract leave idle instead of delaying train (seed 0: in line, 50 s
between instruct and train; behind, none, while download and extract took 20 + 58 s against 12 + 46). The demo CLIP's head alignment (about 20 s, needed by
extract) stays in line: started here as well, it slowed the download from 20 s to 36 s and held the
LLM up past instruct. ``ensure_demo_llm(pending=...)`` waits for the process, then finds the build
cached; a build that failed there runs again in place and raises its own error. Spawned, not forked:
a fresh interpreter with the same recipe, seeds and threads makes the same weights (a test compares
the bytes), and inherits no Ray or thread state.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Optional


def _run(target: Callable[..., Any], nice: int, *args: Any) -> None:
    if nice:
        os.nice(nice)
    target(*args)


def start(name: str, target: Callable[..., Any], *args: Any, nice: int = 0):
    """``target(*args)`` in a spawned daemon process called ``name`` (daemon: it ends with the demo)."""
    proc = multiprocessing.get_context("spawn").Process(target=_run, args=(target, nice, *args), daemon=True, name=name)
    proc.start()
    return proc


def wait(proc: Optional[Any]) -> None:
    """Wait for a process ``start`` returned (None: nothing was started)."""
    if proc is not None:
        proc.join()
