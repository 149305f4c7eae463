"""A two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``, token auth on): the stages
submitted as jobs, each spread over both nodes, and a node lost during extraction and during training.

One scenario, run once for the module (a cluster costs a minute on 2 cores), in a subprocess (this
file run as a script) with its own ``RAY_TMPDIR`` and token (``lingcloud_testing.run_own_cluster``):

1. download: `ray job submit` of ``jobs/download.py`` (the demo corpus from a loopback server); its
   shard tasks are spread, and each shard's manifest entry names the node that fetched it;
2. extract: `ray job submit` of this file's ``--extract-job`` driver (``jobs/extract.py`` plus the
   test's tag): the model is named by a tag (``extract.pretrained: lingcloud_test``) that open_clip's
   table lists with a URL and its own preprocessing (mean/std 0.5, squash, bilinear), registered in
   every worker by the job's setup hook; each node has its own, empty, weights cache
   (``LINGCLOUD_WEIGHTS_CACHE``); each node has 2 logical CPUs and every model actor 1.5, so the pool
   of two actors uses both nodes; while the second node's actor is alive, once it has written a shard
   (or two shards are written), that node's processes are killed (no graceful stop) and a replacement
   node joins, as an autoscaler would;
3. instruct, in the scenario's own driver (captions), and again into a table of its own with a VQA
   source big in bytes, measuring this driver's read()/write() bytes around that run
   (``lingcloud_testing.process_io``): the stage's workers read the sources and write the shards;
   the extract job's driver is measured the same way (reported, see ``run``);
4. train: `ray job submit --no-wait` of ``jobs/train.py``, 2 workers of 1 CPU placed STRICT_SPREAD (one per
   node) with ``max_failures: 2``; after its first checkpoint the node of the rank that is not on
   the head is killed and another joins; Ray Train restarts the worker group from the last checkpoint.

Job drivers run on the head (resource ``drivers``), which is never killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lingcloud_testing import (
    committed_manifest,
    free_port,
    io_delta,
    process_io,
    run_own_cluster,
    start_cluster,
    write_vqa_file,
)

from lmeye.tables import Manifest, shard_file
from schemas import SchemaError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1000)]  # about 5 min alone, more beside other tests
TAG = "lingcloud_test"
TAG_FILE_ENV = "LINGCLOUD_TEST_TAG_FILE"  # where "the hub" serves the tag's file from
TAG_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "resize_mode": "squash"}
CACHES = ("head_cache", "node2_cache", "node3_cache", "driver_cache")
DRIVER_CACHE_ENV = "LINGCLOUD_TEST_DRIVER_CACHE"  # the extract job's driver: a cache it must never use
DRIVER_IO_ENV = "LINGCLOUD_TEST_DRIVER_IO"  # where the extract job's driver writes its measured bytes
MEASURED_RECORDS = 200_000  # the measured instruct run's VQA records: ~12 MB of table, seconds of work
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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

    return [a for a in state.actors().values() if "Encoder" in a.get("ActorClassName", "")]


def _ray_cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args[:3])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _submit(address: str, job_id: str, argv: list[str], runtime_env: dict | None = None) -> None:
    """`ray job submit --no-wait`. The code is read at the same path on every node (as ray_cluster.yaml's
    setup commands install it), not uploaded with --working-dir: all these nodes share one session folder
    on this machine, where one node's runtime-env agent removes an unpacked working dir that a job driver
    on another node runs in. Drivers go to the head (resource "drivers"), which is never lost."""
    cmd = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
           "--entrypoint-resources", '{"drivers": 1}', *(["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []),
           "--", "python", str(REPO / argv[0]), *argv[1:]]
    deadline = time.time() + 90
    while True:  # the head's job agent may come up after its job API does: "No available agent ..., try again later"
        proc = _ray_cli(*cmd, check=False, timeout=120)
        if proc.returncode == 0 or "try again later" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(2)
    if proc.returncode != 0:
        raise RuntimeError(f"ray job submit {job_id} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _finish(client, job_id: str, events: dict, timeout: float = 400) -> None:
    """Wait for the job; its status and the tail of its log go into ``events``."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while client.get_job_status(job_id) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job_id} still running after {timeout}s"
        time.sleep(1)
    events[job_id] = {"status": str(client.get_job_status(job_id)), "log": client.get_job_logs(job_id)}


def _running(client, job_id: str) -> bool:
    from ray.job_submission import JobStatus

    return client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING)


def _manifest_shards(table: Path) -> dict:
    try:
        return Manifest.load(str(table)).shards  # with the shards committed to its journal
    except (AttributeError, SchemaError):  # no manifest yet, or one being written
        return {}


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train has registered (a folder alone may still be uploading: a restart would not use it)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _replace(cluster, node, env: dict | None = None) -> str:
    """Kill a node's processes (no graceful stop) and add another, as an autoscaler would."""
    cluster.remove_node(node, allow_graceful=False)
    return cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", env_vars=env, **_own_agent_port()).node_id


def _own_agent_port() -> dict:
    """Each node's dashboard agent on a free port: its default (52365) is taken by any other Ray on this
    machine (the test session's own, another node), and a head without its agent takes no jobs
    ("No available agent to submit job")."""
    return {"dashboard_agent_listen_port": free_port()}


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}")]


def _extract_then_lose_the_second_node(cluster, worker, client, address: str, root: Path, events: dict, node_env) -> None:
    """The extract job with the test's tag; while the second node's model actor is alive, once a shard it
    encoded is written (or, on a loaded machine where it started late, two shards), that node is lost."""
    _submit(address, "lingcloud-extract", ["tests/test_multinode.py", "--extract-job", *_sets({
        "data.root": root, "extract.model": "lingcloud-tiny-vit", "extract.pretrained": TAG, "extract.dtype": "float32",
        "extract.batch_size": 2, "extract.pool_size": 2, "extract.actor_num_cpus": 1.5, "extract.decode_num_cpus": 0.5,
        "extract.decode_memory_mb": 64, "extract.decode_batch_rows": 2, "extract.debug_delay_s": 2.5,
    })], runtime_env={"worker_process_setup_hook": "test_multinode.register_tag",
                      "env_vars": {"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", DRIVER_CACHE_ENV: str(root / "driver_cache"),
                                   DRIVER_IO_ENV: str(root / "extract_driver_io.json")}})
    deadline = time.time() + 300
    while time.time() < deadline and _running(client, "lingcloud-extract"):
        shards = _manifest_shards(root / "features")
        written = len(shards)
        by_second = any(worker.node_id in s.stats.get("nodes", {}) for s in shards.values())
        # shards are assembled from the actors' staged parts, so in this short run the first commit can
        # come at the very end: a staged part is also "mid-run" (the test allows a late second node)
        staged = any((root / "features" / "_staging").rglob("*.parquet"))
        if (by_second or written >= 2 or staged) and any(
                a["Address"]["NodeID"] == worker.node_id and a["State"] == "ALIVE" for a in _encoder_actors()):
            # while the run goes on: the table is not complete yet (asserted by the test)
            events["shards_before_kill"] = written
            events["killed"] = worker.node_id
            events["replacement"] = _replace(cluster, worker, node_env("node3_cache"))
            break
        time.sleep(0.2)
    _finish(client, "lingcloud-extract", events)
    events["actor_nodes"] = sorted({a["Address"]["NodeID"] for a in _encoder_actors()})


def _train_then_lose_a_rank_node(cluster, client, address: str, root: Path, events: dict) -> None:
    """The train job; after its first checkpoint, the (non-head) node of one rank is lost."""
    stage_dir = root / "train" / "s1"
    _submit(address, "lingcloud-train", ["jobs/train.py", *_sets({
        "data.root": root, "model.llm": root / "shared" / "llm", "model.clip_model": "lingcloud-tiny-vit",
        "model.rvii": "transformer", "model.max_length": 96,
        "train.num_workers": 2, "train.cpus_per_worker": 1, "train.placement_strategy": "STRICT_SPREAD",
        "train.max_failures": 2, "train.precision": "fp32", "train.zero_stage": 2, "train.micro_batch_size": 1,
        "train.checkpoint_every": 2, "train.log_every": 1, "train.shuffle_buffer": 0, "train.val_max_rows": 4,
        "train.stages": [{"name": "s1", "trainable": "instruct", "epochs": 1}],
    })])
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    deadline = time.time() + 300
    while time.time() < deadline and _running(client, "lingcloud-train"):
        starts = stage_dir / "attempts.jsonl"
        if starts.exists() and _registered_checkpoints(stage_dir):
            ranks = json.loads(starts.read_text().splitlines()[0])["nodes"]
            victim = nodes[next(n for n in ranks if n in nodes)]  # a rank's node that is not the head
            events["train_killed"] = victim.node_id
            events["train_replacement"] = _replace(cluster, victim)
            break
        time.sleep(0.2)
    _finish(client, "lingcloud-train", events)


def scenario(root: Path) -> dict:
    import ray
    from ray.job_submission import JobSubmissionClient

    from lmeye import clip
    from lmeye.config import load_config
    from lmeye.demo.corpus import write_corpus, write_url_list
    from lmeye.demo.server import DemoServer
    from lmeye.model.demo import build_tiny_llm
    from lmeye.model.testing import tiny_tokenizer
    from lmeye.stages import STAGES, run

    os.environ[TAG_FILE_ENV] = str(root / "shared" / "tiny.safetensors")
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the jobs' `python` is this venv's
    register_tag()
    clip.save_checkpoint(clip.build_tiny_model(seed=3), os.environ[TAG_FILE_ENV])
    build_tiny_llm(str(root / "shared" / "llm"), "llama", tiny_tokenizer())
    caches = {k: str(root / k) for k in CACHES}
    os.environ[clip.WEIGHTS_CACHE_ENV] = caches["driver_cache"]  # the driver must never need it
    env = {TAG_FILE_ENV: os.environ[TAG_FILE_ENV], "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def node_env(cache: str) -> dict:
        return {**env, clip.WEIGHTS_CACHE_ENV: caches[cache]}

    dashboard = free_port()
    cluster = start_cluster({
        "num_cpus": 2, "resources": {"drivers": 1}, "node_ip_address": "127.0.0.1", "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        # a killed node is declared dead after ~5 s (default ~15 s), so placements stop waiting on it
        # sooner; a live node that is merely busy still answers within 3 s
        "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 3000,
                           "health_check_failure_threshold": 5},
        "dashboard_port": dashboard, "env_vars": node_env("head_cache"), **_own_agent_port()})
    worker = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", env_vars=node_env("node2_cache"), **_own_agent_port())
    address = f"http://127.0.0.1:{dashboard}"
    events: dict = {"head": cluster.head_node.node_id, "second": worker.node_id, "seconds": {}}
    t0 = time.time()

    def mark(phase: str) -> None:  # where the scenario's time goes (printed by the fixture)
        events["seconds"][phase] = round(time.time() - t0, 1)

    corpus = write_corpus(root / "corpus", num_images=20, seed=1, image_size=48)
    try:
        with DemoServer(corpus.root) as server:
            urls = write_url_list(corpus, server.base_url, root / "urls.jsonl", fmt="jsonl")
            deadline = time.time() + 90  # the job server answers a little after the head is up
            while _ray_cli("job", "list", "--address", address, check=False).returncode != 0:
                assert time.time() < deadline, "the job server did not come up"
                time.sleep(1)
            _submit(address, "lingcloud-download", ["jobs/download.py", "--config", str(REPO / "configs" / "demo.yaml"), *_sets({
                "data.root": root, "download.input": urls, "download.input_format": "jsonl",
                "download.samples_per_shard": 4})])
            _finish(JobSubmissionClient(address), "lingcloud-download", events)
        mark("download")
        anon = dict(os.environ, HOME=str(root / "anon"))
        for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
            anon.pop(k, None)
        refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=anon,
                                 capture_output=True, text=True)
        events["anonymous_refused"] = refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        # this driver only watches (actors, nodes); the stages run as jobs
        ray.init(address=cluster.address, logging_level="WARNING")
        client = JobSubmissionClient(address)
        _extract_then_lose_the_second_node(cluster, worker, client, address, root, events, node_env)
        assert "killed" in events, "the extract job ended before the second node wrote a shard: " + events["lingcloud-extract"]["log"][-3000:]
        _wait_until(events["killed"], alive=False)  # the train job's STRICT_SPREAD must not count on it
        _wait_until(events["replacement"], alive=True)
        mark("extract")
        cfg = load_config(None, [f"data.root={root}", "instruct.val_fraction=0.1"])
        events["instruct_ok"] = run(STAGES["instruct"], cfg).ok
        mark("instruct")
        events["instruct_io"] = _measured_instruct(root)  # after a first run: lazy imports are not the stage's
        events["extract_io"] = json.loads((root / "extract_driver_io.json").read_text())
        mark("instruct measured")
        _train_then_lose_a_rank_node(cluster, client, address, root, events)
        mark("train")
        events["caches"] = {k: sorted(os.listdir(v)) if os.path.isdir(v) else [] for k, v in caches.items()}
        return events
    finally:
        ray.shutdown()
        cluster.shutdown()


def _measured_instruct(root: Path) -> dict:
    """instruct into a table of its own (the train job reads the first one) from the captions and
    a VQA source big in bytes, so rows, not fixed metadata, make the table's bytes; returns this
    driver's read()/write() bytes during the run."""
    from lmeye.config import load_config
    from lmeye.stages import STAGES, run

    pairs = pa.concat_tables(pq.read_table(root / "pairs" / shard_file(n), columns=["url", "status"])
                             for n in sorted(_manifest(root / "pairs")["shards"]))
    names = [u.rsplit("/", 1)[-1] for u, s in zip(pairs["url"].to_pylist(), pairs["status"].to_pylist()) if s == "success"]
    src = write_vqa_file(root / "vqa_measured.json", names, MEASURED_RECORDS)
    cfg = load_config(None, {"data.root": str(root), "instruct.val_fraction": 0.1,
                             "instruct.output": str(root / "instructions_measured"),
                             "instruct.sources": [{"kind": "captions"}, {"kind": "vqa", "path": src}]})
    before = process_io()
    ok = run(STAGES["instruct"], cfg).ok
    return {"ok": ok, **io_delta(before, process_io())}


def _wait_until(node_id: str, alive: bool, timeout: float = 60) -> None:
    import ray

    deadline = time.time() + timeout
    while not any(n["NodeID"] == node_id and n["Alive"] == alive for n in ray.nodes()):
        assert time.time() < deadline, f"node {node_id} not {'alive' if alive else 'dead'} after {timeout}s"
        time.sleep(0.5)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_nodes")
    # HOME is moved: open_clip's default cache would be in it, and nothing may land there
    proc = run_own_cluster([__file__, str(root)], cwd=root, env={"HOME": str(root / "home")}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("two-node scenario, seconds from the cluster's start:", result["seconds"])
    # the extract job's driver, measured like instruct's but not asserted: its table is 20 tiny rows,
    # so fixed per-run bytes (lazy imports, manifests, logs; not broken down) hide any per-row cost
    print("extract job driver read()/write() bytes:", result["extract_io"], "features table bytes:",
          sum(s["bytes"] for s in _manifest(root / "features")["shards"].values()))
    return root, result


def _manifest(table: Path) -> dict:
    return committed_manifest(table)


def test_download_job_fetched_on_both_nodes(run):
    root, result = run
    job = result["lingcloud-download"]
    assert "SUCCEEDED" in job["status"] and "== download finished" in job["log"], job["log"]
    shards = _manifest(root / "pairs")["shards"]
    assert len(shards) >= 4
    assert {s["stats"]["node"] for s in shards.values()} == {result["head"], result["second"]}
    assert result["anonymous_refused"]  # token auth is on: a client without the token is refused


def test_extraction_ran_on_both_nodes_and_finished_after_losing_one(run):
    root, result = run
    job = result["lingcloud-extract"]
    assert "SUCCEEDED" in job["status"] and "== extract finished" in job["log"], job["log"]  # in the same run
    assert result.get("killed") == result["second"], result
    assert result["shards_before_kill"] < len(_manifest(root / "pairs")["shards"])  # killed mid-run
    assert {result["head"], result["second"]} <= set(result["actor_nodes"])  # a model actor on each node
    pairs = pa.concat_tables(pq.read_table(root / "pairs" / shard_file(n), columns=["uid", "status"])
                             for n in sorted(_manifest(root / "pairs")["shards"]))
    manifest = _manifest(root / "features")
    assert manifest["complete"]
    got = pa.concat_tables(pq.read_table(root / "features" / shard_file(n), columns=["uid"])
                           for n in sorted(manifest["shards"]))
    uids = got["uid"].to_pylist()
    success = {u for u, s in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist()) if s == "success"}
    assert len(uids) == len(set(uids)) and set(uids) == success  # one row per successful uid
    encoded_on = {n for s in manifest["shards"].values() for n in s["stats"]["nodes"]}
    # where the rows were encoded, as the manifest says: only on this cluster's nodes (which of them
    # depends on when each model actor started, and the loss now comes as soon as the run stages a part)
    assert encoded_on and encoded_on <= {result["head"], result["second"], result["replacement"]}


def test_two_worker_training_spans_two_nodes_and_restarts_from_a_checkpoint_after_losing_one(run):
    root, result = run
    job = result["lingcloud-train"]
    assert "SUCCEEDED" in job["status"], job["log"]
    assert result.get("train_killed"), "the run ended before its first checkpoint: " + job["log"]
    stage = root / "train" / "s1"
    starts = [json.loads(line) for line in (stage / "attempts.jsonl").read_text().splitlines()]
    first, last = starts[0], starts[-1]
    assert first["resumed_step"] is None and len(set(first["nodes"])) == 2  # one rank on each node
    assert result["train_killed"] in first["nodes"] and result["train_killed"] not in last["nodes"]
    assert len(starts) >= 2 and last["resumed_step"] >= 1  # restarted from a checkpoint, not from scratch
    assert "resumed at epoch" in job["log"] and "from a checkpoint" in job["log"]  # the summary says so
    summary = json.loads((stage / "summary.json").read_text())
    metrics = summary["metrics"]
    rows = sum(pq.read_metadata(p).num_rows for p in (root / "instructions").glob("train-*.parquet"))
    skipped = sum(v for k, v in json.loads(metrics["skipped"]).items() if k != "resumed_skip")
    assert metrics["rows"] + skipped == rows  # each row trained once, despite the restart
    assert (stage / "model" / "ipn.safetensors").exists()


def test_the_instruct_driver_reads_and_writes_under_1_percent_of_its_tables_bytes(run):
    """The stage's workers read the sources and write the shards; its driver reads metadata and
    records shards. The driver's read()/write() bytes (/proc/self/io rchar + wchar, around the run;
    see lingcloud_testing.process_io) against the bytes of the table it made (its manifest)."""
    root, result = run
    moved = result["instruct_io"]
    assert moved["ok"]
    table_bytes = sum(s["bytes"] for s in _manifest(root / "instructions_measured")["shards"].values())
    assert table_bytes > 10_000_000  # rows, not fixed metadata, make its bytes
    print(f"instruct driver: {moved} against {table_bytes} table bytes: "
          f"{(moved['rchar'] + moved['wchar']) / table_bytes:.4%}")
    assert moved["rchar"] + moved["wchar"] < 0.01 * table_bytes, (moved, table_bytes)


def test_each_node_resolved_the_tag_into_its_own_cache(run):
    root, result = run
    caches = result["caches"]
    assert caches["head_cache"] == ["tiny.safetensors"] and caches["node2_cache"] == ["tiny.safetensors"]
    assert caches["driver_cache"] == []  # nothing through the driver
    assert not list((root / "home").rglob("*.safetensors")) and not list((root / "home").rglob("*.bin"))


def test_features_are_the_tags_model_with_its_own_preprocessing(run):
    import io

    import open_clip
    import torch
    from open_clip.pretrained import _PRETRAINED
    from PIL import Image

    from lmeye import clip
    from lmeye.store import FeatureStore

    root, _ = run
    clip.register_model_configs()
    entry = {"file": str(root / "shared" / "tiny.safetensors"), **TAG_PREPROCESS}
    _PRETRAINED.setdefault(clip.TINY_MODEL, {})["lingcloud_test_ref"] = entry
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(clip.TINY_MODEL, pretrained="lingcloud_test_ref")
    finally:
        del _PRETRAINED[clip.TINY_MODEL]["lingcloud_test_ref"]
    features = pa.concat_tables(pq.read_table(p, columns=["uid", "status"]) for p in sorted((root / "features").glob("train-*.parquet")))
    encoded = {u for u, s in zip(features["uid"].to_pylist(), features["status"].to_pylist()) if s == "success"}
    pairs = pa.concat_tables(pq.read_table(p, columns=["uid", "image"]) for p in sorted((root / "pairs").glob("train-*.parquet")))
    good = [(u, b) for u, b in zip(pairs["uid"].to_pylist(), pairs["image"].to_pylist()) if u in encoded]
    assert len(good) >= 16
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for _, b in good]),
                                        normalize=True)
    got = FeatureStore.open(str(root / "features")).get([u for u, _ in good])["embedding"]
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(np.asarray(got, np.float32)), ref, dim=-1)
    assert cos.min().item() >= 0.9999, cos


def _extract_job_driver(argv: list[str]) -> int:
    """`python tests/test_multinode.py --extract-job --set ...`: jobs/extract.py with the test's tag known
    here too (the driver reads the tag's preprocessing from open_clip's table)."""
    from lmeye import clip
    from lmeye.entry import job_main
    from pipelines.extract import run as extract

    os.environ[clip.WEIGHTS_CACHE_ENV] = os.environ[DRIVER_CACHE_ENV]
    register_tag()
    before = process_io()
    try:
        return job_main(extract, argv)
    finally:
        Path(os.environ[DRIVER_IO_ENV]).write_text(json.dumps(io_delta(before, process_io())))


if __name__ == "__main__" and sys.argv[1] == "--extract-job":
    sys.exit(_extract_job_driver(sys.argv[2:]))
elif __name__ == "__main__":
    out = scenario(Path(sys.argv[1]))
    (Path(sys.argv[1]) / "scenario.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
