"""Tables in object storage: download -> extract -> instruct with ``data.root=s3://...`` on a real
S3-compatible server (moto's server mode on 127.0.0.1, started here), then the tables read back
with the feature store and HF ``datasets``. What S3 changes: no rename (a shard is committed by
writing its final key), and a remote table's serving copy lives in a local cache folder."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from lingcloud_testing import moto_s3

from lmeye import clip
from lmeye.config import load_config
from lmeye.store import SERVING, FeatureStore
from lmeye.tables import MANIFEST, STAGING, Manifest, TableReader
from schemas.features import FEATURES
from schemas.instructions import INSTRUCTIONS
from schemas.pairs import PAIRS, SUCCESS

pytestmark = pytest.mark.slow
BUCKET = "lingcloud-test"
ROOT = f"s3://{BUCKET}/root"
_SCHEMAS = {"pairs": PAIRS, "features": FEATURES, "instructions": INSTRUCTIONS}


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with one bucket (``lingcloud_testing.moto_s3``): s3fs here and in
    every Ray worker (the stages forward the AWS variables, the keys by explicit opt-in) reach it.
    Nothing in this module reaches for the hub, so HF_HUB_OFFLINE is unset there."""
    with moto_s3(BUCKET) as fs:
        yield fs


@pytest.fixture(scope="module")
def pipeline(ray_local, s3, demo_corpus, demo_server, tmp_path_factory):
    """The three stages, each reading its input from and writing its table to the bucket (Ray
    first: as in a whole test session, its workers predate the AWS variables)."""
    from lmeye.demo.corpus import write_url_list
    from pipelines import download, extract, instruct

    urls = write_url_list(demo_corpus, demo_server.base_url, tmp_path_factory.mktemp("s3urls") / "urls.csv")
    cfg = load_config(None, {
        "data.root": ROOT, "download.input": str(urls), "ray.num_cpus": 2,
        "download.samples_per_shard": 24, "download.thread_count": 4, "download.timeout": 2,
        "download.image_size": 32,
        "extract.model": clip.TINY_MODEL, "extract.pretrained": None, "extract.dtype": "float32",
        "extract.batch_size": 8, "extract.decode_num_cpus": 0.5,
    })
    summaries = []
    for stage in (download, extract, instruct):
        summaries.append(stage.run(cfg))
        assert summaries[-1].ok, summaries[-1].render()
    s3.invalidate_cache()
    return cfg, summaries


def test_stages_write_complete_tables_to_the_bucket(s3, pipeline, demo_corpus):
    cfg, _ = pipeline
    manifests = {name: Manifest.load(f"{ROOT}/{name}") for name in ("pairs", "features", "instructions")}
    assert all(m is not None and m.complete for m in manifests.values())

    pairs = TableReader(cfg.download.output, PAIRS).read(columns=["uid", "status"])
    assert pairs.num_rows == manifests["pairs"].num_rows == len(demo_corpus.items) + len(demo_corpus.broken)
    ok = sorted(u for u, s in zip(pairs["uid"].to_pylist(), pairs["status"].to_pylist()) if s == SUCCESS)
    assert len(ok) == len(demo_corpus.good_names())

    features = TableReader(cfg.extract.output, FEATURES).read(columns=["uid", "status"])
    assert features.num_rows == manifests["features"].num_rows == len(ok)  # one row per successful pair
    assert sorted(features["uid"].to_pylist()) == ok
    assert manifests["instructions"].num_rows == TableReader(cfg.instruct.output, INSTRUCTIONS).num_rows > 0

    # Every shard the manifests list is in the bucket under its final key; no scratch is left.
    keys = s3.find(f"{BUCKET}/root")
    for name in manifests:
        listed = {f.rsplit("/", 1)[1] for f in TableReader(f"{ROOT}/{name}", _SCHEMAS[name]).files}
        found = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"{BUCKET}/root/{name}/")}
        assert found == listed | {MANIFEST}, name
    assert not [k for k in keys if STAGING in k or ".tmp-" in k or SERVING in k]


def test_feature_store_serves_from_a_local_cache(s3, pipeline, tmp_path, monkeypatch):
    cfg, _ = pipeline
    monkeypatch.setenv("HOME", str(tmp_path))  # the default cache folder is under ~/.cache
    store = FeatureStore.open(cfg.extract.output)
    assert store.serving_dir.startswith(str(tmp_path)) and not store.serving_dir.startswith("s3:")
    features = TableReader(cfg.extract.output, FEATURES).read(columns=["uid", "embedding"])
    uids = features["uid"].to_pylist()
    got = store.get(uids[::-1])
    expected = features["embedding"].combine_chunks().flatten().to_numpy().reshape(len(uids), -1)[::-1]
    assert got["embedding"].shape == expected.shape and (got["embedding"] == expected).all()
    s3.invalidate_cache()
    assert not s3.glob(f"{BUCKET}/root/features/{SERVING}*")  # nothing written into the bucket


def test_hf_datasets_reads_the_instructions_table(s3, pipeline, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # datasets reads HF_HUB_OFFLINE once, at import (earlier in a whole session): offline, it refuses s3://
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg, _ = pipeline
    files = TableReader(cfg.instruct.output, INSTRUCTIONS).files
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == Manifest.load(cfg.instruct.output).num_rows
    first = pq.read_table(s3.open(files[0].removeprefix("s3://")), columns=["sample_id"])["sample_id"][0].as_py()
    assert ds[0]["sample_id"] == first


def test_shards_are_committed_by_their_final_key(s3):
    """No rename on S3: a shard is uploaded under its final key (visible only once complete), and
    an aborted shard leaves no object at all."""
    import pyarrow as pa

    from lmeye.tables import ShardWriter, shard_file

    path = f"{ROOT}/commits"
    table = pa.table({"x": list(range(10))})
    done = ShardWriter(path, "00000.parquet", table.schema)
    done.write(table)
    assert not s3.exists(f"{BUCKET}/root/commits/{shard_file('00000.parquet')}")  # not before close
    info = done.close()
    dropped = ShardWriter(path, "00001.parquet", table.schema)
    dropped.write(table)
    dropped.abort()
    s3.invalidate_cache()
    assert [k.rsplit("/", 1)[1] for k in s3.find(f"{BUCKET}/root/commits")] == [shard_file("00000.parquet")]
    assert pq.read_table(s3.open(f"{BUCKET}/root/commits/{shard_file('00000.parquet')}")).equals(table)
    assert info.rows == 10 and info.bytes == s3.size(f"{BUCKET}/root/commits/{shard_file('00000.parquet')}")
    s3.rm(f"{BUCKET}/root/commits", recursive=True)
