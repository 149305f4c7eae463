"""The demo pipeline end to end: corpus -> loopback HTTP -> download -> extract -> instruct."""

from __future__ import annotations

import socket

import pyarrow.compute as pc

from lmeye.config import load_config
from lmeye.demo.run import run_demo
from lmeye.tables import Manifest, TableReader
from schemas.pairs import PAIRS, SUCCESS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_pipeline_end_to_end(tmp_path, ray_local, capsys):
    # One port for both runs: uids come from URLs, so a rerun must serve the same ones.
    cfg = load_config("configs/demo.yaml", {
        "data.root": str(tmp_path / "demo"), "demo.num_images": 16, "demo.port": _free_port(),
        "download.samples_per_shard": 8,
    })
    summaries = run_demo(cfg)
    out = capsys.readouterr().out
    assert [s.stage for s in summaries] == ["download", "extract", "instruct"]
    assert all(s.ok for s in summaries), out
    for stage in ("download", "extract", "instruct"):
        assert f"== {stage} finished" in out
    assert "[demo] ok" in out

    pairs = TableReader(cfg.download.output, PAIRS).read(columns=["uid", "url", "status"])
    assert pairs.num_rows == 16 + 4  # every good image and every broken entry, once
    good = set(pairs.filter(pc.equal(pairs["status"], SUCCESS))["uid"].to_pylist())
    assert len(good) == 16

    features = Manifest.load(cfg.extract.output)
    assert features is not None and features.complete and features.table == "features"

    instructions = Manifest.load(cfg.instruct.output)
    assert instructions is not None and instructions.complete and instructions.num_rows > 16

    # Rerunning the demo redoes nothing.
    again = run_demo(cfg)
    assert all(s.ok and s.shards_done == 0 for s in again[:2])
