"""Extraction on a two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``): a CLIP tag
resolved by each node into its own cache, and the second node lost mid-run.

One scenario, run once for the module (a two-node cluster costs a minute on 2 cores), in a
subprocess (this file run as a script) with its own ``RAY_TMPDIR`` (``lingcloud_testing.run_own_cluster``):

* the model is named by a tag (``extract.pretrained: lingcloud_test``) that open_clip's table lists
  with a URL and its own preprocessing (mean/std 0.5, squash, bilinear), registered in every worker
  by a setup hook; each node has its own, empty, weights cache (``LINGCLOUD_WEIGHTS_CACHE``);
* each node has 2 logical CPUs and every model actor 1.5, so the pool of two actors uses both nodes;
* once the second node's model actor is alive, that node's processes are killed (no graceful stop)
  and a replacement node joins, as an autoscaler would add one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lingcloud_testing import build_pairs_table, run_own_cluster, start_cluster

from lmeye.tables import shard_file

pytestmark = pytest.mark.slow
TAG = "lingcloud_test"
TAG_FILE_ENV = "LINGCLOUD_TEST_TAG_FILE"  # where "the hub" serves the tag's file from
TAG_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}
CACHES = ("head_cache", "node2_cache", "node3_cache", "driver_cache")


# ----------------------------------------------------------------------------- the subprocess


def register_tag() -> None:
    """The tag as open_clip's table would list it: a URL and its own preprocessing (a worker setup hook)."""
    from open_clip.pretrained import _PRETRAINED

    from lmeye import clip

    clip.register_model_configs()
    _PRETRAINED.setdefault(clip.TINY_MODEL, {})[TAG] = {
        "url": "file://" + os.environ[TAG_FILE_ENV], "hf_hub": "", **TAG_PREPROCESS}


def _encoder_actors() -> list[dict]:
    import ray._private.state as state

    return [a for a in state.actors().values() if "_Encoder" in a.get("ActorClassName", "")]


def _kill_second_node_when_busy(cluster, worker, out_dir: Path, events: dict, node_env: dict) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        on_worker = [a for a in _encoder_actors() if a["Address"]["NodeID"] == worker.node_id and a["State"] == "ALIVE"]
        if on_worker:  # while the run goes on: the table is not complete yet (asserted by the test)
            events["shards_before_kill"] = len(list(out_dir.glob("train-*.parquet")))
            cluster.remove_node(worker, allow_graceful=False)
            events["killed"] = worker.node_id
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", env_vars=node_env("node3_cache"))
            return
        time.sleep(0.2)


def scenario(root: Path) -> dict:
    import ray

    from lmeye import clip
    from lmeye.config import load_config
    from lmeye.stages import STAGES, run

    os.environ[TAG_FILE_ENV] = str(root / "shared" / "tiny.safetensors")
    register_tag()
    clip.save_checkpoint(clip.build_tiny_model(seed=3), os.environ[TAG_FILE_ENV])
    caches = {k: str(root / k) for k in CACHES}
    os.environ[clip.WEIGHTS_CACHE_ENV] = caches["driver_cache"]  # the driver must never need it
    env = {TAG_FILE_ENV: os.environ[TAG_FILE_ENV], "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def node_env(cache: str) -> dict:
        return {**env, clip.WEIGHTS_CACHE_ENV: caches[cache]}

    cluster = start_cluster({
        "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False, "env_vars": node_env("head_cache")})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", env_vars=node_env("node2_cache"))
    try:
        ray.init(address=cluster.address, logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": register_tag, "env_vars": env})
        cfg = load_config(None, [
            f"data.root={root}", f"extract.model={clip.TINY_MODEL}", f"extract.pretrained={TAG}",
            "extract.dtype=float32", "extract.batch_size=2", "extract.pool_size=2", "extract.actor_num_cpus=1.5",
            "extract.decode_num_cpus=0.5", "extract.decode_memory_mb=64", "extract.decode_batch_rows=2",
            "extract.debug_delay_s=0.5",
        ])
        events: dict = {}
        killer = threading.Thread(target=_kill_second_node_when_busy,
                                  args=(cluster, worker, Path(cfg.extract.output), events, node_env), daemon=True)
        killer.start()
        summary = run(STAGES["extract"], cfg)
        killer.join(timeout=5)
        return {
            "ok": summary.ok, "notes": summary.notes,
            "head": cluster.head_node.node_id, "second": worker.node_id,
            "actor_nodes": sorted({a["Address"]["NodeID"] for a in _encoder_actors()}),
            "events": events,
            "caches": {k: sorted(os.listdir(v)) if os.path.isdir(v) else [] for k, v in caches.items()},
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    table = build_pairs_table(root / "pairs", 24, shards=6, size=32)
    # HOME is moved: open_clip's default cache would be in it, and nothing may land there
    proc = run_own_cluster([__file__, str(root)], cwd=root, env={"HOME": str(root / "home")}, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, table, json.loads(proc.stdout.strip().splitlines()[-1])


def test_extraction_ran_on_both_nodes_and_finished_after_losing_one(run):
    root, table, result = run
    assert result["ok"], result["notes"]  # the job finished in the same run
    assert result["events"].get("killed") == result["second"], result
    assert result["events"]["shards_before_kill"] < 6  # killed mid-run
    assert {result["head"], result["second"]} <= set(result["actor_nodes"])  # a model actor on each node
    success = {u for u, s in zip(table["uid"].to_pylist(), table["status"].to_pylist()) if s == "success"}
    manifest = json.loads((root / "features" / "_manifest.json").read_text())
    assert manifest["complete"]
    got = pa.concat_tables(pq.read_table(root / "features" / shard_file(n), columns=["uid"])
                           for n in sorted(manifest["shards"]))
    uids = got["uid"].to_pylist()
    assert len(uids) == len(set(uids)) and set(uids) == success  # one row per successful uid


def test_each_node_resolved_the_tag_into_its_own_cache(run):
    root, _, result = run
    caches = result["caches"]
    assert caches["head_cache"] == ["tiny.safetensors"] and caches["node2_cache"] == ["tiny.safetensors"]
    assert caches["driver_cache"] == []  # nothing through the driver
    assert not (root / "home").exists()


def test_features_are_the_tags_model_with_its_own_preprocessing(run):
    import io

    import open_clip
    import torch
    from open_clip.pretrained import _PRETRAINED
    from PIL import Image

    from lmeye import clip
    from lmeye.store import FeatureStore

    root, table, _ = run
    clip.register_model_configs()
    entry = {"file": str(root / "shared" / "tiny.safetensors"), **TAG_PREPROCESS}
    _PRETRAINED.setdefault(clip.TINY_MODEL, {})["lingcloud_test_ref"] = entry
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(clip.TINY_MODEL, pretrained="lingcloud_test_ref")
    finally:
        del _PRETRAINED[clip.TINY_MODEL]["lingcloud_test_ref"]
    good = [(u, b) for u, s, b, c in zip(table["uid"].to_pylist(), table["status"].to_pylist(),
                                         table["image"].to_pylist(), table["caption"].to_pylist())
            if s == "success" and c != "not an image"]
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for _, b in good]),
                                        normalize=True)
    got = FeatureStore.open(str(root / "features")).get([u for u, _ in good])["embedding"]
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(np.asarray(got, np.float32)), ref, dim=-1)
    assert cos.min().item() >= 0.9999, cos


if __name__ == "__main__":
    print(json.dumps(scenario(Path(sys.argv[1]))))
