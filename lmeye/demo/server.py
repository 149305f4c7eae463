"""A loopback HTTP server for the demo corpus, so the download stage runs with no network.

Routes:
- `/<path>`: the file `root/<path>` (GET and HEAD), else 404.
- `/status/<code>/<anything>`: answers HTTP `<code>` (how the corpus simulates a 500).
- `/slow/<seconds>/<path>`: sleeps (at most 30 s), then serves `/<path>`; provokes time-outs.
- `/big/<bytes>[/unsized]`: a body of that many bytes (at most 4 GiB), generated as it is sent;
  `unsized` omits Content-Length (the body ends when the connection closes). Tests the cap on
  response sizes without a big file on disk.

Use `DemoServer` in-process, `python -m lmeye.demo.server ROOT [--port N]` from a shell or a job,
or `start_server_process` when the server must outlive a process a test kills.
"""

from __future__ import annotations

import argparse
import mimetypes
import os
import selectors
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

MAX_SLOW_SECONDS = 30.0
MAX_BIG_BYTES = 4 << 30
_PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the `lmeye` package


class _Handler(BaseHTTPRequestHandler):
    server: "_QuietHTTPServer"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def log_message(self, format: str, *args) -> None:
        """Silence the default per-request line on stderr; `DemoServer.requests` keeps the log."""

    def _answer(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.server.demo._log(path)
        parts = path.lstrip("/").split("/")
        if parts[0] == "big" and len(parts) >= 2 and parts[1].isdigit():
            self._big(min(int(parts[1]), MAX_BIG_BYTES), sized="unsized" not in parts[2:], send_body=send_body)
            return
        status, body, content_type = self._route(path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _big(self, size: int, sized: bool, send_body: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "image/jpeg")
        if sized:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        block = b"\0" * (1 << 16)
        try:
            while send_body and size > 0:  # stop as soon as the client hangs up
                self.wfile.write(block[:size])
                size -= len(block)
        except (ConnectionError, OSError):
            pass
        self.close_connection = True

    def _route(self, path: str) -> tuple[int, bytes, str]:
        parts = path.lstrip("/").split("/")
        if parts[0] == "status" and len(parts) >= 2:
            return _status_response(parts[1])
        if parts[0] == "slow" and len(parts) >= 3:
            try:
                seconds = float(parts[1])
            except ValueError:
                return _text_response(HTTPStatus.BAD_REQUEST)
            time.sleep(min(max(seconds, 0.0), MAX_SLOW_SECONDS))
            return self._file_response("/".join(parts[2:]))
        return self._file_response("/".join(parts))

    def _file_response(self, relative: str) -> tuple[int, bytes, str]:
        root = self.server.demo.root
        target = (root / relative).resolve()
        # Refuse paths that escape the root (e.g. "../../etc/passwd").
        if not target.is_relative_to(root) or not target.is_file():
            return _text_response(HTTPStatus.NOT_FOUND)
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return HTTPStatus.OK, target.read_bytes(), content_type


def _text_response(status: int) -> tuple[int, bytes, str]:
    return status, f"{int(status)} {HTTPStatus(status).phrase}\n".encode(), "text/plain"


def _status_response(code: str) -> tuple[int, bytes, str]:
    try:
        return _text_response(HTTPStatus(int(code)))
    except ValueError:  # not a number, or not a known HTTP status
        return _text_response(HTTPStatus.BAD_REQUEST)


class _QuietHTTPServer(ThreadingHTTPServer):
    # Handler threads must not keep the process alive or block shutdown while one sleeps.
    daemon_threads = True
    # img2dataset opens dozens of connections at once; socketserver's default backlog of 5
    # drops SYNs, and each drop costs the client a retransmission second (or a time-out).
    request_queue_size = 512
    demo: "DemoServer"

    def handle_error(self, request, client_address) -> None:
        """Clients that time out and hang up are expected here; report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class DemoServer:
    """Serve `root` on 127.0.0.1 from a daemon thread; a context manager.

    `requests` lists every request path received, in order, so tests can count retries.
    """

    def __init__(self, root: str | Path, port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._httpd: _QuietHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("DemoServer is not running; call start() or use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "DemoServer":
        if self._httpd is not None:
            raise RuntimeError("DemoServer is already running")
        self._httpd = _QuietHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.demo = self
        # A short poll interval makes stop() return promptly instead of after up to half a second.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="demo-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> "DemoServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _log(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def request_count(self, path_suffix: str) -> int:
        """How many requests so far had a path ending with `path_suffix`."""
        with self._lock:
            return sum(path.endswith(path_suffix) for path in self.requests)

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()


def serve_forever_cli(argv: list[str] | None = None) -> None:
    """`python -m lmeye.demo.server ROOT [--port N]`: print the base URL, then serve until killed."""
    parser = argparse.ArgumentParser(
        prog="python -m lmeye.demo.server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("root", type=Path, help="directory to serve (e.g. a demo corpus root)")
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind on 127.0.0.1 (0: any free port)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    with DemoServer(args.root, port=args.port) as server:
        print(server.base_url, flush=True)  # the parent reads this line; it must not sit in a buffer
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


def start_server_process(
    root: str | Path, port: int = 0, timeout: float = 10.0
) -> tuple[subprocess.Popen, str]:
    """Run the CLI in a subprocess and return it with its base URL; the caller terminates it.

    For tests where the server must outlive a process they kill (e.g. a SIGKILLed download worker).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "lmeye.demo.server", str(root), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout)
    line = process.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        process.kill()
        process.wait()
        raise RuntimeError(
            f"demo server process {command} did not print its URL within {timeout} s "
            f"(exit code {process.returncode})"
        )
    return process, line


if __name__ == "__main__":
    serve_forever_cli()
