"""The demo's quiet console: Ray's worker output, library logs and stage chatter go to a log file in
the run's folder; the console gets one live progress line per stage and the summaries.

Everything written to file descriptors 1 and 2 while the console is quiet lands in the log, whoever
writes it: Python's ``sys.stdout``/``sys.stderr``, logging handlers that captured the original
streams, Ray's driver thread that prints forwarded worker lines, C++ code and child processes.
Only ``Console.say`` and the progress line reach what was the console when it started (a duplicate
of the terminal's descriptor, or, under pytest's ``capsys``, the capturing object).
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, TextIO


class Console:
    def __init__(self, out: TextIO, log_path: Optional[Path]):
        self.out = out
        self.log_path = log_path  # None: verbose, nothing is redirected
        self.live = out.isatty() if hasattr(out, "isatty") else False

    def say(self, text: str) -> None:
        self.out.write(text.rstrip("\n") + "\n")
        self.out.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """One progress line while ``name`` runs: rewritten in place with the elapsed time on a terminal,
        written once elsewhere (a log or a pipe keeps no carriage returns)."""
        started, done = time.time(), threading.Event()
        if self.log_path is None:  # verbose: the stage's own output is the progress
            yield
            return
        if not self.live:
            self.say(f"-> {name} ...")
            yield
            return

        def tick() -> None:
            while not done.wait(1.0):
                self.out.write(f"\r-> {name} ... {time.time() - started:.0f} s ")
                self.out.flush()

        thread = threading.Thread(target=tick, daemon=True)
        self.out.write(f"-> {name} ...")
        self.out.flush()
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.out.write(f"\r-> {name} ... {time.time() - started:.0f} s\n")
            self.out.flush()


def _terminal_stream(current: TextIO) -> tuple[TextIO, bool]:
    """What the user sees once descriptors 1 and 2 are redirected: (stream, whether we opened it)."""
    try:
        fd = current.fileno()
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return current, False  # not a descriptor (pytest's capsys): it is not redirected
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace"), True


@contextmanager
def quiet_console(log_path: str | Path, quiet: bool = True) -> Iterator[Console]:
    """``quiet``: descriptors 1 and 2 (and ``sys.stdout``/``sys.stderr``) point at ``log_path`` until
    the block ends; the path is said once. Not quiet: nothing changes (``--verbose``)."""
    if not quiet:
        yield Console(sys.stdout, None)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, opened = _terminal_stream(sys.stdout)
    console = Console(out, log_path)
    console.say(f"[demo] Ray's and the stages' output: {log_path} (--verbose shows it here)")
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved_fds = (os.dup(1), os.dup(2))
    saved_streams = (sys.stdout, sys.stderr)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        yield console
    finally:
        log.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        log.close()
        if opened:
            out.close()
