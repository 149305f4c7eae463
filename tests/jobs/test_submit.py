"""`ray job submit --working-dir .` against a real Ray head on 127.0.0.1, token auth on."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lingcloud_testing import free_port

from lmeye.demo.corpus import write_url_list
from lmeye.tables import TableReader
from schemas.pairs import PAIRS, SUCCESS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head started with `ray start --head --block`; stopping it touches no other cluster."""
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The job's `python` is whatever the cluster's PATH finds: this venv, as on a real node.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this cluster's token, not ~/.ray's
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--port=0",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         # its own dashboard agent port: the default (52365) is held by the test session's Ray, and a head
         # without its agent takes no jobs ("No available agent to submit job")
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, "ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # a test cluster: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_download_job_via_ray_job_submit(tmp_path, ray_head, demo_corpus, demo_server):
    address, env = ray_head
    urls = write_url_list(demo_corpus, demo_server.base_url, tmp_path / "urls.jsonl", fmt="jsonl")
    out = tmp_path / "pairs"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--runtime-env-json", '{"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}',
           "--", "python", "jobs/download.py", "--config", "configs/demo.yaml",
           "--set", f"download.input={urls}", "--set", "download.input_format=jsonl",
           "--set", f"download.output={out}", "--set", "download.samples_per_shard=8"]
    deadline = time.time() + 90
    while True:  # the head's job agent may come up after its job API: "No available agent ..., try again later"
        job = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        if job.returncode == 0 or "try again later" not in job.stdout + job.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "== download finished" in job.stdout

    table = TableReader(str(out), PAIRS).read()
    assert table.num_rows == len(demo_corpus.items) + len(demo_corpus.broken)
    ok = {u.rsplit("/", 1)[1] for u, s in zip(table["url"].to_pylist(), table["status"].to_pylist()) if s == SUCCESS}
    assert ok == set(demo_corpus.good_names())

    # Token auth is on: a client without the token is refused.
    anon = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    anon["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                             env=anon, capture_output=True, text=True)
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()
