"""img2dataset's progress logger process, ignoring Ctrl-C.

A module of its own because it imports img2dataset (slow: OpenCV, albumentations), which
`pipelines.download` only imports when a pass starts, and because the spawned logger process
finds its class by module name. The driver handles Ctrl-C; the logger would only print a
KeyboardInterrupt traceback of its own.
"""

from __future__ import annotations

import signal

from img2dataset.logger import LoggerProcess


class QuietLoggerProcess(LoggerProcess):
    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        super().run()
