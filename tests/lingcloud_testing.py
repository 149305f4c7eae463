"""Test helpers importable by name from any test (``pythonpath = ["tests"]`` in pyproject):
tables built as the stages would write them, without downloading or a model, and a runner for
scripts that start their own Ray cluster.

conftest.py's fixtures wrap these; tests that need them outside a fixture import them from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

from lmeye.demo.corpus import generate_items, render
from schemas.features import FEATURES, TEXT_EMBEDDING, features_schema
from lmeye.tables import TableWriter
from lmeye.uid import uid_for
from schemas.pairs import FAILED_TO_DOWNLOAD, PAIRS, SUCCESS

REPO = Path(__file__).resolve().parents[1]


def build_pairs_table(
    path: str | Path,
    num_images: int = 12,
    *,
    shards: int = 2,
    seed: int = 0,
    size: int = 32,
    corrupt: int = 1,
    failed: int = 1,
    coco_names: bool = False,
) -> pa.Table:
    """Write a `pairs` table as the download stage would, without downloading.

    Rows: ``num_images`` good demo images, then ``corrupt`` rows marked success whose bytes
    are not an image (to exercise decode failures downstream), then ``failed`` rows that
    failed to download. Returns the concatenated table. ``coco_names``: the good images' URLs
    are COCO's (``.../train2017/000000000007.jpg`` for the 8th image), not the demo's names.
    """
    items = generate_items(num_images, seed=seed)
    rows = []
    for i, item in enumerate(items):
        img = render(item, size=size)
        url = (f"http://images.cocodataset.org/train2017/{i:012d}.jpg" if coco_names
               else f"http://127.0.0.1/images/{item.name}")
        rows.append(
            dict(uid=uid_for(url), url=url, caption=item.caption, status=SUCCESS, error_message=None,
                 width=size, height=size, original_width=size, original_height=size,
                 sha256=hashlib.sha256(img).hexdigest(), image=img)
        )
    for i in range(corrupt):
        url = f"http://127.0.0.1/images/corrupt_{i}.jpg"
        rows.append(dict(uid=uid_for(url), url=url, caption="not an image", status=SUCCESS, error_message=None,
                         width=size, height=size, original_width=size, original_height=size,
                         sha256=None, image=b"this is not a jpeg"))
    for i in range(failed):
        url = f"http://127.0.0.1/images/missing_{i}.jpg"
        rows.append(dict(uid=uid_for(url), url=url, caption="missing", status=FAILED_TO_DOWNLOAD,
                         error_message="HTTP Error 404: Not Found", width=None, height=None,
                         original_width=None, original_height=None, sha256=None, image=None))
    table = pa.Table.from_pylist(rows, schema=PAIRS.with_metadata(PAIRS.schema))
    writer = TableWriter(str(path), PAIRS, config={"fixture": "pairs", "seed": seed})
    per = max(1, -(-table.num_rows // shards))
    names = []
    for k, start in enumerate(range(0, table.num_rows, per)):
        name = f"{k:05d}.parquet"
        writer.write(name, table.slice(start, per))
        names.append(name)
    counts = pa.compute.value_counts(table["status"]).to_pylist()
    writer.finalize(names, stats={"by_status": {c["values"]: c["counts"] for c in counts}})
    return table


def build_features_table(path: str | Path, uids: list[str], failed: list[str] = (), *, dim: int = 4,
                         shards: int = 2) -> Path:
    """Write a `features` table as the extract stage would, without a model: a deterministic
    unit ``embedding`` of width ``dim`` per uid, and ``failed`` uids as failed_to_decode rows."""
    import numpy as np

    from schemas.features import FAILED_TO_DECODE, FEATURES, features_schema

    schema = features_schema(dim, "float32")
    rows = [(u, SUCCESS, None) for u in uids] + [(u, FAILED_TO_DECODE, "cannot identify image file") for u in failed]
    vectors = []
    for u, status, _ in rows:
        v = np.frombuffer(hashlib.sha256(u.encode()).digest()[: 4 * dim], dtype=np.uint8)[:dim].astype(np.float32) + 1
        vectors.append((v / np.linalg.norm(v)).tolist() if status == SUCCESS else None)
    table = pa.table({"uid": [r[0] for r in rows], "status": [r[1] for r in rows], "error_message": [r[2] for r in rows],
                      "embedding": vectors}, schema=schema)
    writer = TableWriter(str(path), FEATURES, config={"fixture": "features", "dim": dim})
    per = max(1, -(-table.num_rows // shards))
    names = []
    for k, start in enumerate(range(0, max(table.num_rows, 1), per)):
        names.append(f"{k:05d}.parquet")
        writer.write(names[-1], table.slice(start, per))
    writer.finalize(names, stats={}, metadata={"embed_dim": str(dim), "dtype": "float32"})
    return Path(path)


def curate_pairs_row(name: str, image: bytes | None, caption: str = "a red circle on a blue background", *, size=(64, 64), **extra):
    url = f"http://example.test/{name}"
    w, h = size
    return dict(uid=uid_for(url), url=url, caption=caption, status=SUCCESS if image else FAILED_TO_DOWNLOAD,
                error_message=None if image else "404", width=w, height=h, original_width=w, original_height=h,
                sha256=None, image=image, **extra)


def write_curate_tables(root: Path, rows: list[dict], emb: np.ndarray, text: np.ndarray | None = None, shards: int = 2,
                 extra: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A pairs table (with LAION-style ``extra`` columns) and its features table (``emb`` rows, and caption
    embeddings ``text``), same shard names, for the curate stage."""
    dim = emb.shape[1]
    schema = PAIRS.schema
    for col in extra:
        schema = schema.append(pa.field(col, pa.float32()))
    pairs = pa.Table.from_pylist(rows, schema=PAIRS.with_metadata(schema))
    ok = [r["image"] is not None for r in rows]
    fschema = features_schema(dim, "float32")
    if text is not None:
        fschema = fschema.append(pa.field(TEXT_EMBEDDING, pa.list_(pa.float32(), dim)))
    pw = TableWriter(str(root / "pairs"), PAIRS, config={"test": 1})
    fw = TableWriter(str(root / "features"), FEATURES, config={"test": 1})
    per = -(-len(rows) // shards)
    names = []
    for k in range(shards):
        name = f"{k:05d}.parquet"
        names.append(name)
        idx = [i for i in range(k * per, min(len(rows), (k + 1) * per))]
        pw.write(name, pairs.take(idx))
        fidx = [i for i in idx if ok[i]]
        cols = {"uid": [rows[i]["uid"] for i in fidx], "status": [SUCCESS] * len(fidx), "error_message": [None] * len(fidx),
                "embedding": [emb[i].tolist() for i in fidx]}
        if text is not None:
            cols[TEXT_EMBEDDING] = [text[i].tolist() for i in fidx]
        fw.write(name, pa.table(cols, schema=fschema))
    pw.finalize(names, stats={})
    fw.finalize(names, stats={})
    return root / "pairs", root / "features"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers and Ray processes a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str):
    """moto's S3 server on 127.0.0.1 (a free port) holding an empty ``bucket``; the AWS variables
    point s3fs at it in this process and in every process started meanwhile (their values also
    reach Ray workers: ``LMEYE_FORWARD_CREDENTIALS``). ``HF_HUB_OFFLINE`` is unset (``datasets``
    refuses s3:// under it). Yields an s3fs filesystem on the server."""
    import pytest
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
            "HF_UPDATE_DOWNLOAD_COUNTS": "0",
            # an embedded Ray started before these keys were set: ship them (opt-in)
            "LMEYE_FORWARD_CREDENTIALS": "1",
        }.items():
            mp.setenv(key, value)
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def run_own_cluster(args: list[str], *, cwd: Path, env: dict[str, str] | None = None,
                    timeout: float = 500) -> subprocess.CompletedProcess:
    """Run ``python *args`` that starts its own Ray cluster (``ray.cluster_utils.Cluster``).

    The child gets its own short ``RAY_TMPDIR`` and auth token (token auth on, as ``ray start`` has it), so its cluster never meets the session's
    embedded Ray, and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which makes Ray keep 127.0.0.1 as this machine's address
    (otherwise ``ray.init`` rewrites a 127.0.0.1 GCS address to the host's routable IP, where nothing
    listens). No ``RAY_ADDRESS`` leaks in.
    """
    ray_tmp = tempfile.mkdtemp(prefix="lc-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    # Its own auth token: once this process has started Ray, RAY_AUTH_MODE=token is in the environment,
    # and a child whose HOME moved would find no ~/.ray/auth_token (its GCS server then exits at start).
    child = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO),
                 NO_ALBUMENTATIONS_UPDATE="1", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                 RAY_gcs_server_port_wait_time_s="90", **(env or {}))
    child.pop("RAY_ADDRESS", None)
    try:
        return subprocess.run([sys.executable, *args], env=child, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def start_cluster(head_args: dict):
    """``ray.cluster_utils.Cluster`` with its head, in a script run by ``run_own_cluster``; when the head
    fails to start, the GCS server's own log goes to stderr (Ray's error alone says only "timed out")."""
    import glob

    from ray.cluster_utils import Cluster

    try:
        return Cluster(initialize_head=True, head_node_args=head_args)
    except RuntimeError:
        pattern = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray", "session_*", "logs", "gcs_server.*")
        for log in sorted(glob.glob(pattern)):
            with open(log, errors="replace") as f:
                print(f"--- {log}\n" + f.read()[-2000:], file=sys.stderr)
        raise


def committed_manifest(table: str | os.PathLike) -> dict:
    """A table's manifest as JSON, with the shards committed to its journal since the last
    compaction (what every reader sees; `_manifest.json` alone lags a running stage). {} if none."""
    import json

    from lmeye.tables import Manifest
    from schemas import SchemaError

    try:
        manifest = Manifest.load(str(table))
    except SchemaError:  # a journal line being written
        return {}
    return json.loads(manifest.to_json()) if manifest is not None else {}


def process_io() -> dict[str, int]:
    """This process's I/O counters (``/proc/self/io``), to measure what passes through a driver.

    ``rchar``/``wchar`` count the bytes of every read()/write() call: files (table shards, spill
    files, manifests, configs, and the ``.py`` files of a lazy import), pipes and sockets read or
    written with read()/write(). They do not count mmap (Arrow's memory-mapped files, Ray's object
    store) or sendmsg/recvmsg (gRPC, which carries Ray's task calls and small results).
    ``read_bytes``/``write_bytes`` count only what reached the disk, so a read served from the
    page cache counts 0: of the two pairs, rchar/wchar is the honest upper bound of the bytes a
    process moved through files."""
    counters = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            counters[key] = int(value)
    return counters


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("rchar", "wchar")}


def write_vqa_file(path: str | Path, images: list[str], records: int, seed: int = 0) -> str:
    """A VQA JSON list of ``records`` distinct question/answer records over ``images`` (names),
    with random hex in both (about 100 bytes a record that compression cannot shrink), so an
    instructions table built from it is big in bytes for its rows."""
    import json
    import random

    rng = random.Random(seed)
    recs = [{"image": images[i % len(images)], "question": f"What does code {rng.getrandbits(128):032x} say?",
             "answer": f"{rng.getrandbits(192):048x}"} for i in range(records)]
    Path(path).write_text(json.dumps(recs))
    return str(path)
