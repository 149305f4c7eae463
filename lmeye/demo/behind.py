"""The demo's own models, built behind the pipeline.

``lmeye demo`` starts their builds in processes of their own before it writes the corpus, so their
training overlaps the corpus, Ray's start and the download instead of delaying the stages that need
them: the demo CLIP's head alignment (about 20 s, needed by extract) and the demo LLM (about 50 s on
one core, needed by train; at a lower priority, on the core the stages leave idle). Each ``ensure_*``
call that needs a build waits for its process first, then finds the build cached; a build that failed
there runs again in place and raises its own error. Spawned, not forked: a fresh interpreter with the
same recipe, seeds and threads makes the same weights, and inherits no Ray or thread state.
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
