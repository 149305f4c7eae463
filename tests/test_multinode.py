"""Extraction on a two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``), and losing a node.

Each scenario runs in a subprocess (this file run as a script) with its own ``RAY_TMPDIR``, so its
cluster never meets the session's embedded Ray nor any other Ray on the machine. The nodes get
2 logical CPUs each and every model actor 1.5, so the pool of two actors must use both nodes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lingcloud_testing import build_pairs_table, run_own_cluster

from lmeye.tables import shard_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- the subprocess


def _encoder_actors() -> list[dict]:
    import ray._private.state as state

    return [a for a in state.actors().values() if "_Encoder" in a.get("ActorClassName", "")]


def _kill_second_node_when_busy(cluster, worker, out_dir: Path, events: dict) -> None:
    """Once the second node's model actor is alive and a first features shard is written, kill
    the node's processes (no graceful stop), then add a replacement node as an autoscaler would."""
    deadline = time.time() + 240
    while time.time() < deadline:
        on_worker = [a for a in _encoder_actors() if a["Address"]["NodeID"] == worker.node_id and a["State"] == "ALIVE"]
        shards = list(out_dir.glob("train-*.parquet"))
        if on_worker and shards:
            events["killed_after_shards"] = len(shards)
            cluster.remove_node(worker, allow_graceful=False)
            events["killed"] = worker.node_id
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
            return
        time.sleep(0.2)


def scenario(root: Path, kill: bool) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from lmeye import clip
    from lmeye.config import load_config
    from lmeye.stages import STAGES, run

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cfg = load_config(None, [
            f"data.root={root}", f"extract.model={clip.TINY_MODEL}", f"extract.pretrained={root / 'tiny.safetensors'}",
            "extract.dtype=float32", "extract.batch_size=2", "extract.pool_size=2", "extract.actor_num_cpus=1.5",
            "extract.decode_num_cpus=0.5", "extract.decode_memory_mb=64", "extract.decode_batch_rows=2",
            f"extract.debug_delay_s={0.5 if kill else 0}",
        ])
        events: dict = {}
        killer = None
        if kill:
            killer = threading.Thread(
                target=_kill_second_node_when_busy, args=(cluster, worker, Path(cfg.extract.output), events), daemon=True)
            killer.start()
        summary = run(STAGES["extract"], cfg)
        if killer is not None:
            killer.join(timeout=5)
        return {
            "ok": summary.ok, "notes": summary.notes,
            "head": cluster.head_node.node_id, "second": worker.node_id,
            "actor_nodes": sorted({a["Address"]["NodeID"] for a in _encoder_actors()}),
            "events": events,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def pairs(tmp_path):
    from lmeye import clip
    from lmeye.config import load_config

    table = build_pairs_table(tmp_path / "pairs", 16, shards=4, size=32)
    cfg = load_config(None, [f"data.root={tmp_path}", f"extract.model={clip.TINY_MODEL}",
                             f"extract.pretrained={tmp_path / 'tiny.safetensors'}"])
    clip.ensure_demo_model(cfg.extract)
    return tmp_path, table


def _run_scenario(root: Path, kill: bool) -> dict:
    proc = run_own_cluster([__file__, str(root), "kill" if kill else "plain"], cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _one_row_per_successful_uid(root: Path, table: pa.Table) -> None:
    success = {u for u, s in zip(table["uid"].to_pylist(), table["status"].to_pylist()) if s == "success"}
    manifest = json.loads((root / "features" / "_manifest.json").read_text())
    assert manifest["complete"]
    got = pa.concat_tables(pq.read_table(root / "features" / shard_file(n), columns=["uid"])
                          for n in sorted(manifest["shards"]))
    uids = got["uid"].to_pylist()
    assert len(uids) == len(set(uids)) and set(uids) == success


def test_extraction_runs_on_both_nodes(pairs):
    root, table = pairs
    result = _run_scenario(root, kill=False)
    assert result["ok"], result["notes"]
    assert set(result["actor_nodes"]) == {result["head"], result["second"]}  # a model actor on each node
    _one_row_per_successful_uid(root, table)


def test_losing_the_second_node_mid_extraction(pairs):
    root, table = pairs
    result = _run_scenario(root, kill=True)
    assert result["events"].get("killed") == result["second"], result
    assert result["ok"], result["notes"]  # the job finished in the same run
    _one_row_per_successful_uid(root, table)


if __name__ == "__main__":
    print(json.dumps(scenario(Path(sys.argv[1]), sys.argv[2] == "kill")))
