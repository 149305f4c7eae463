"""The demo's quiet console: everything written to descriptors 1 and 2 goes to the log; the console
gets only what ``say`` and the progress lines write; ``verbose`` changes nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from lmeye.demo.console import quiet_console

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys
    from lmeye.demo.console import quiet_console

    logging.basicConfig(stream=sys.stderr, level=logging.INFO)  # a handler holding the original stderr, as Ray's
    with quiet_console(sys.argv[1], quiet=sys.argv[2] == "quiet") as console:
        with console.stage("train"):
            print("python print")
            logging.getLogger("ray.data").info("execution plan")
            os.write(2, b"C-level stderr\\n")
            subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
        console.say("== train finished")
    print("after the block")
""")
CHATTER = ("python print", "execution plan", "C-level stderr", "child process")


def _run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logs" / "demo.log"), mode], capture_output=True,
                          text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=60, check=True)


def test_quiet_console_sends_every_writer_to_the_log(tmp_path):
    done = _run(tmp_path, "quiet")
    shown = done.stdout.splitlines()
    assert shown == [f"[demo] Ray's and the stages' output: {tmp_path}/logs/demo.log (--verbose shows it here)",
                     "-> train ...", "== train finished", "after the block"]
    assert done.stderr == ""
    log = (tmp_path / "logs" / "demo.log").read_text()
    assert all(line in log for line in CHATTER), log


def test_verbose_shows_everything_and_writes_no_log(tmp_path):
    done = _run(tmp_path, "verbose")
    both = done.stdout + done.stderr
    assert all(line in both for line in CHATTER) and "== train finished" in done.stdout
    assert not (tmp_path / "logs").exists()


def test_under_capsys_say_reaches_the_capture(tmp_path, capsys):
    with quiet_console(tmp_path / "demo.log") as console:
        console.say("summary line")
        print("chatter")
    out = capsys.readouterr().out
    assert "summary line" in out and "chatter" not in out
    assert "chatter" in (tmp_path / "demo.log").read_text()
