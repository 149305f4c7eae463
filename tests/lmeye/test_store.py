"""The feature store on synthetic features tables (no Ray, no model)."""

from __future__ import annotations

import json
import mmap
import os

import numpy as np
import pyarrow as pa
import pytest

from lmeye.cli import main
from lmeye.patch_codec import codec
from lmeye.store import FeatureStore, MissingUidError, VersionError, table_version
from lmeye.tables import Manifest, TableWriter, shard_file
from lmeye.uid import uid_for
from schemas import SchemaError
from schemas.features import FAILED_TO_DECODE, FEATURES, SUCCESS, features_schema

META = {"model": "toy", "pretrained": "none", "checkpoint_sha256": "", "image_size": "32", "dtype": "float16",
        "embed_dim": "8", "precision": "fp32"}


def write_features(path, n=40, shards=3, dim=8, failed=(3, 17), patch=None, seed=0, dtype="float16", uids=None,
                   encoding=None):
    """A finished features table: rows i in ``failed`` are decode failures. Returns (uids, vectors).

    ``encoding`` (``lmeye.patch_codec``) stores the patch tokens compactly; the returned tokens are
    then the float32 originals."""
    rng = np.random.default_rng(seed)
    uids = list(uids) if uids is not None else [uid_for(f"http://x/{i}.jpg") for i in range(n)]
    n = len(uids)
    vecs = rng.standard_normal((n, dim)).astype(dtype)
    tok_rng = np.random.default_rng(seed + 1000)  # its own stream: a longer table keeps a shorter one's rows
    toks = tok_rng.standard_normal((n, patch[0] * patch[1])).astype(np.float32 if encoding else dtype) if patch else None
    schema = features_schema(dim, dtype, patch, META, patch_encoding=encoding)
    if patch:
        stored, scales = codec(encoding or dtype).encode(toks.reshape(n, *patch))
    ok = np.array([i not in failed for i in range(n)])
    writer = TableWriter(str(path), FEATURES, config={"toy": seed}, overwrite=True)  # tests regenerate tables in place
    per = -(-n // shards)
    names = []
    for k, start in enumerate(range(0, n, per)):
        sl = slice(start, min(n, start + per))
        m = ~ok[sl]
        cols = {
            "uid": pa.array(uids[sl]),
            "status": pa.array([SUCCESS if o else FAILED_TO_DECODE for o in ok[sl]]),
            "error_message": pa.array([None if o else "OSError: broken" for o in ok[sl]], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs[sl].reshape(-1)), dim, mask=pa.array(m)),
        }
        if patch:
            cols["patch_tokens"] = pa.FixedSizeListArray.from_arrays(pa.array(stored[sl].reshape(-1)), patch[0] * patch[1])
            if scales is not None:
                cols["patch_scales"] = pa.FixedSizeListArray.from_arrays(pa.array(scales[sl].reshape(-1)), scales.shape[1])
        name = f"{k:05d}.parquet"
        writer.write(name, pa.table(cols, schema=schema))
        names.append(name)
    writer.finalize(names, stats={}, metadata=META)
    return uids, vecs, toks, ok


def test_get_returns_request_order_and_exact_values(tmp_path):
    uids, vecs, _, ok = write_features(tmp_path / "f")
    store = FeatureStore.open(tmp_path / "f")
    assert store.num_rows == ok.sum() and store.dim == 8 and store.model == "toy"
    assert store.metadata["dtype"] == "float16"
    want = [i for i in np.random.default_rng(1).permutation(len(uids)) if ok[i]]
    res = store.get([uids[i] for i in want])
    assert res["embedding"].dtype == np.float16 and res["embedding"].shape == (len(want), 8)
    np.testing.assert_array_equal(res["embedding"], vecs[want])
    assert res.found.all()
    assert store.get(uids[0])["embedding"].shape == (1, 8)


def test_missing_uids_raise_listing_them_or_come_back_masked(tmp_path):
    uids, vecs, _, ok = write_features(tmp_path / "f")
    store = FeatureStore.open(tmp_path / "f")
    failed_uid = uids[3]  # a decode failure: in the table, never served
    ask = [uids[0], "f" * 32, failed_uid, "not-a-uid", uids[1]]
    with pytest.raises(MissingUidError) as err:
        store.get(ask)
    assert err.value.missing == ["f" * 32, failed_uid, "not-a-uid"]
    assert "3 uid(s) not in" in str(err.value) and failed_uid in str(err.value)
    res = store.get(ask, on_missing="mask")
    assert res.found.tolist() == [True, False, False, False, True]
    np.testing.assert_array_equal(res["embedding"][[0, 4]], vecs[[0, 1]])
    assert not res["embedding"][1:4].any()
    assert res.missing == ["f" * 32, failed_uid, "not-a-uid"]
    assert store.contains(ask).tolist() == [True, False, False, False, True]
    assert uids[0] in store and failed_uid not in store


def test_patch_tokens_come_back_shaped(tmp_path):
    uids, _, toks, _ = write_features(tmp_path / "f", patch=(4, 6))
    store = FeatureStore.open(tmp_path / "f")
    assert store.patch_shape == (4, 6)
    res = store.get([uids[5], uids[0]], columns=["embedding", "patch_tokens"])
    assert res["patch_tokens"].shape == (2, 4, 6)
    np.testing.assert_array_equal(res["patch_tokens"].reshape(2, -1), toks[[5, 0]])
    with pytest.raises(KeyError, match="has: embedding, patch_tokens"):
        store.get([uids[0]], columns=["nope"])


def test_versions_follow_the_manifest_and_can_be_pinned(tmp_path):
    path = tmp_path / "f"
    uids, vecs, _, _ = write_features(path, seed=0)
    first = FeatureStore.open(path)
    v1 = first.version
    assert v1 == table_version(Manifest.load(str(path))) and first.is_current()
    assert FeatureStore.open(path, version=v1).version == v1
    # the table is rewritten (say, extraction rerun with another model): a new version
    _, vecs2, _, _ = write_features(path, seed=1)
    assert not first.is_current()
    second = FeatureStore.open(path)
    assert second.version != v1 and second.current
    np.testing.assert_array_equal(second.get([uids[0]])["embedding"][0], vecs2[0])
    # the pinned old version is still served from its kept copy
    pinned = FeatureStore.open(path, version=v1)
    assert not pinned.current
    np.testing.assert_array_equal(pinned.get([uids[0]])["embedding"][0], vecs[0])
    with pytest.raises(VersionError, match=f"at version {second.version}, not the pinned 0123456789abcdef"):
        FeatureStore.open(path, version="0123456789abcdef")


def test_old_serving_copies_are_pruned(tmp_path):
    path = tmp_path / "f"
    versions = []
    for seed in range(4):
        write_features(path, seed=seed)
        versions.append(FeatureStore.open(path, keep_versions=2).version)
    kept = sorted(d for d in os.listdir(path / "_serving") if not d.startswith("."))
    assert kept == sorted(versions[-2:])


def test_incomplete_or_foreign_tables_are_refused(tmp_path, make_pairs):
    pairs_path, _ = make_pairs()
    with pytest.raises(SchemaError, match="'pairs' table, expected 'features'"):
        FeatureStore.open(pairs_path)
    path = tmp_path / "f"
    write_features(path)
    m = json.loads((path / "_manifest.json").read_text())
    m["complete"] = False
    (path / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaError, match="incomplete"):
        FeatureStore.open(path)


def test_uids_sharing_their_top_64_bits_are_told_apart(tmp_path):
    """128-bit uids: two images whose uids agree on the first 16 hex characters are both served."""
    top = uid_for("a")[:16]
    uids = [top + uid_for(f"lo{i}")[16:] for i in range(6)] + [uid_for(f"http://x/{i}") for i in range(10)]
    _, vecs, _, ok = write_features(tmp_path / "f", uids=uids, failed=())
    store = FeatureStore.open(tmp_path / "f")
    assert store.num_rows == len(uids)
    order = list(np.random.default_rng(0).permutation(len(uids)))
    np.testing.assert_array_equal(store.get([uids[i] for i in order])["embedding"], vecs[order])
    assert not store.contains([top + "0" * 16, uids[0][:16]]).any()


def test_a_version_must_be_a_version_id_not_a_path(tmp_path):
    path = tmp_path / "f"
    write_features(path)
    FeatureStore.open(path)
    for bad in ("../../../etc", "..", "/tmp", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "a/b"):
        with pytest.raises(VersionError, match="is not a features table version"):
            FeatureStore.open(path, version=bad)
    assert main(["store", "info", str(path), "--version", "../x"]) == 2


def test_tables_written_with_64_bit_uids_ask_to_be_regenerated(tmp_path, capsys):
    path = tmp_path / "f"
    write_features(path)
    m = json.loads((path / "_manifest.json").read_text())
    m["schema_version"] = 1
    (path / "_manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaError, match="schema version 1, this code reads version 3: uids are 128-bit.*regenerate"):
        FeatureStore.open(path)
    assert main(["store", "info", str(path)]) == 2
    assert "regenerate" in capsys.readouterr().err
    # a lone shard of an old table says the same, not "missing column"
    old = FEATURES.schema.with_metadata({b"lingcloud.table": b"features", b"lingcloud.schema_version": b"1"})
    with pytest.raises(SchemaError, match="version 1.*regenerate"):
        FEATURES.check(old, "x.parquet")


def test_cli_info_get_and_missing(tmp_path, capsys):
    uids, vecs, _, _ = write_features(tmp_path / "f")
    assert main(["store", "info", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert "rows         38 served of 40" in out and "model              toy" in out and "version" in out
    assert main(["store", "get", str(tmp_path / "f"), uids[0]]) == 0
    line = capsys.readouterr().out.strip()
    got = np.array(line.split("\t")[2].split(), dtype=np.float32)
    np.testing.assert_allclose(got, vecs[0].astype(np.float32), rtol=1e-5)
    assert main(["store", "get", str(tmp_path / "f"), uids[0], "ab" * 16]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith("lmeye store: error: 1 uid(s) not in")
    assert captured.err.strip().endswith("ab" * 16) and "\n" not in captured.err.strip()
    assert main(["store", "get", "--json", "--mask", str(tmp_path / "f"), "ab" * 16]) == 0
    assert json.loads(capsys.readouterr().out) == {"uid": "ab" * 16, "found": False}


def _cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("encoding", ["int8_token", "int8_channel"])
def test_int8_patch_tokens_stay_int8_on_disk_and_come_back_as_floats(tmp_path, encoding):
    uids, _, toks, ok = write_features(tmp_path / "f", patch=(16, 32), encoding=encoding)
    store = FeatureStore.open(tmp_path / "f")
    assert store.patch_shape == (16, 32) and store.info()["columns"]["patch_tokens"]["encoding"] == encoding
    seg_root = tmp_path / "f" / "_serving" / ".segments"
    for seg in os.listdir(seg_root):
        assert np.load(seg_root / seg / "patch_tokens.npy", mmap_mode="r").dtype == np.int8
        assert (seg_root / seg / "patch_scales.npy").exists()
    want = [i for i in range(len(uids)) if ok[i]][::-1]
    res = store.get([uids[i] for i in want], columns=["patch_tokens"])
    got = res["patch_tokens"]
    assert got.dtype == np.float32 and got.shape == (len(want), 16, 32)
    orig = toks[want].reshape(-1, 16, 32)
    assert _cosine(got, orig).min() > 0.999
    # each value within half a quantisation step (plus the float16 scale's rounding) of the original
    axis = 2 if encoding == "int8_token" else 1
    step = np.abs(orig).max(axis=axis, keepdims=True) / 127
    assert (np.abs(got - orig) <= step * 0.5 * 1.01 + 1e-6).all()


def test_version_2_tables_still_read(tmp_path):
    """A table written before patch encodings: schema version 2, no lingcloud.patch_encoding metadata."""
    import pyarrow.parquet as pq

    path = tmp_path / "f"
    uids, _, toks, ok = write_features(path, patch=(4, 6))
    for f in path.glob("*.parquet"):  # rewrite each shard as version 2 wrote it
        t = pq.read_table(f)
        meta = {k: v for k, v in t.schema.metadata.items() if k not in (b"lingcloud.patch_encoding", b"lingcloud.patch_pool")}
        meta[b"lingcloud.schema_version"] = b"2"
        pq.write_table(t.replace_schema_metadata(meta), f)
    m = json.loads((path / "_manifest.json").read_text())
    m["schema_version"] = 2
    m["shards"] = {n: {**s, "bytes": os.path.getsize(path / shard_file(n))} for n, s in m["shards"].items()}
    (path / "_manifest.json").write_text(json.dumps(m))
    store = FeatureStore.open(path)
    res = store.get([uids[5]], columns=["patch_tokens"])
    assert res["patch_tokens"].dtype == np.float16
    np.testing.assert_array_equal(res["patch_tokens"].reshape(-1), toks[5])
    assert store.info()["columns"]["patch_tokens"]["encoding"] == "float16"


def test_adding_shards_builds_only_their_segments(tmp_path):
    path = tmp_path / "f"
    all_uids = [uid_for(f"http://x/{i}.jpg") for i in range(60)]
    write_features(path, uids=all_uids[:40], shards=4, patch=(4, 6), encoding="int8_token", failed=())
    first = FeatureStore.open(path)
    assert first.info()["rows_served"] == 40 and first._meta["segments_built"] == 4
    # the same 40 rows as the same four shards, plus two new shards: only the new ones are built
    uids, vecs, _, _ = write_features(path, uids=all_uids, shards=6, patch=(4, 6), encoding="int8_token", failed=())
    second = FeatureStore.open(path)
    assert second.version != first.version and second._meta["segments_built"] == 2
    assert len(second._meta["segments"]) == 6 and second.num_rows == 60
    pick = [59, 0, 41, 17, 39, 40]
    np.testing.assert_array_equal(second.get([uids[i] for i in pick])["embedding"], vecs[pick])
    # the old version's index still serves, sharing the four old segments
    assert FeatureStore.open(path, version=first.version).get([uids[3]])["embedding"][0].tolist() == vecs[3].tolist()


def test_segments_no_kept_version_uses_are_pruned(tmp_path, monkeypatch):
    import lmeye.store as store_mod

    monkeypatch.setattr(store_mod, "SEGMENT_GRACE_S", -1)  # no concurrent builder here
    path = tmp_path / "f"
    for seed in range(3):
        write_features(path, seed=seed, shards=2)
        FeatureStore.open(path, keep_versions=1)
    kept = FeatureStore.open(path)
    assert sorted(os.listdir(path / "_serving" / ".segments")) == sorted(sid for sid, _ in kept._meta["segments"])


def test_a_large_get_over_several_segments_keeps_request_order(tmp_path):
    uids, vecs, _, ok = write_features(tmp_path / "f", n=700, shards=3, failed=())
    store = FeatureStore.open(tmp_path / "f")
    want = np.random.default_rng(3).permutation(700)[:500]  # rows of three segments, read ahead then gathered
    np.testing.assert_array_equal(store.get([uids[i] for i in want])["embedding"], vecs[want])


@pytest.mark.parametrize("index_memory", [0, 1 << 30], ids=["mapped", "resident"])
def test_every_uid_is_found_through_the_fence_at_block_edges(tmp_path, monkeypatch, index_memory):
    """The index is searched in the block its in-memory fence points to: with blocks of 4 records,
    runs of uids sharing their top 64 bits straddle block edges, and the smallest and largest
    uids sit in the first and last blocks (at 10M rows a block is 170 records, a page)."""
    import lmeye.store as store_mod

    monkeypatch.setattr(store_mod, "FENCE_ROWS", 4)
    rng = np.random.default_rng(1)
    uids = [uid_for(f"http://x/{i}") for i in range(200)] + ["0" * 32, "f" * 32]
    for run in range(5):  # runs of 1 to 9 uids with one hi: some inside a block, some across an edge
        top = rng.bytes(8).hex()
        uids += [top + rng.bytes(8).hex() for _ in range(1 + 2 * run)]
    _, vecs, _, _ = write_features(tmp_path / "f", uids=uids, failed=(), shards=4)
    store = FeatureStore.open(tmp_path / "f", index_memory=index_memory)
    assert store._fence.size == -(-len(uids) // 4) and store.index_resident == bool(index_memory)
    order = rng.permutation(len(uids))
    np.testing.assert_array_equal(store.get([uids[i] for i in order])["embedding"], vecs[order])
    ranked = sorted(uids)
    between = [f"{int(u, 16) + 1:032x}" for u in ranked[:-1] if int(u, 16) + 1 < int(ranked[ranked.index(u) + 1], 16)]
    absent = between + ["f" * 31 + "e" if "f" * 31 + "e" not in uids else "0" * 31 + "1"]
    assert store.contains(uids).all() and not store.contains(absent).any()
    res = store.get(absent[:3] + uids[:2], on_missing="mask")
    assert res.found.tolist() == [False] * 3 + [True] * 2
    np.testing.assert_array_equal(res["embedding"][3:], vecs[:2])
    monkeypatch.setattr(store_mod, "FENCE_ROWS", 64)  # a copy is read with the fence it was built with
    again = FeatureStore.open(tmp_path / "f", index_memory=index_memory)
    np.testing.assert_array_equal(again.get(uids[::-1])["embedding"], vecs[::-1])


def test_a_copy_with_an_older_index_gets_a_new_index_from_its_segments(tmp_path):
    """A serving copy whose index has another layout (before the fence: uid_hi/uid_lo/row.npy) is
    reindexed on open from its segments; no segment is rebuilt and no Parquet row is read."""
    path = tmp_path / "f"
    uids, vecs, _, ok = write_features(path)
    first = FeatureStore.open(path)
    meta_file = os.path.join(first.serving_dir, "meta.json")
    meta = json.loads(open(meta_file).read())
    meta.pop("index_format")
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(first.serving_dir, "uid_index.npy"))
    for name in sorted(Manifest.load(str(path)).shards)[1:]:  # their rows come from the segments
        os.remove(path / shard_file(name))  # (the first shard's schema is still read)
    again = FeatureStore.open(path)
    assert again.serving_dir == first.serving_dir and again.info()["segments_built"] == 0
    served = [u for u, o in zip(uids, ok) if o]
    np.testing.assert_array_equal(again.get(served)["embedding"], vecs[ok])


def test_two_workers_on_one_node_build_one_serving_copy(tmp_path, monkeypatch):
    """Train workers and predict actors open the store at the same moment: one builds, the other
    waits for the lock and opens that copy (before: each built its own, a full read of the table)."""
    import threading
    import time

    import lmeye.store as store

    write_features(tmp_path / "f", n=30)
    builds = []
    real = store._build

    def slow_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(1.0)  # long enough that the second opener arrives mid-build
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_build", slow_build)
    opened, errors = [], []

    def worker():
        try:
            opened.append(FeatureStore.open(tmp_path / "f", cache_dir=str(tmp_path / "cache")))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(builds) == 1
    assert opened[0].serving_dir == opened[1].serving_dir and opened[0].num_rows == opened[1].num_rows == 28


def test_read_ahead_asks_for_each_rows_pages_once_merging_near_ones(tmp_path):
    """A cold get queues every page it will read before reading any (MADV_WILLNEED): one request
    per run of nearby pages, the file's partial last page included, nothing past its end."""
    import mmap

    import lmeye.store as store_mod

    np.save(tmp_path / "v.npy", np.zeros((1000, 1000), np.uint8))  # ~4 rows a page
    mapped = store_mod._load(str(tmp_path / "v.npy"))
    asked = []

    class Recorder:
        def __init__(self, mm):
            self.mm = mm

        def __len__(self):
            return len(self.mm)

        def madvise(self, option, start, length):
            asked.append((option, start, length))

    mapped.mm = Recorder(mapped.mm)
    mapped.prefetch(np.array([999, 0, 1, 500, 2]))
    page, size = mmap.PAGESIZE, os.path.getsize(tmp_path / "v.npy")
    assert all(opt == mmap.MADV_WILLNEED and start % page == 0 for opt, start, _ in asked)
    covered = [(start, start + length) for _, start, length in asked]
    assert len(covered) == 3 and covered[-1][1] == size  # rows 0-2 together, 500, 999 up to the end of the file
    for row in (0, 1, 2, 500, 999):
        a, b = mapped.offset + row * 1000, mapped.offset + (row + 1) * 1000
        assert any(lo <= a and b <= hi for lo, hi in covered)


def test_a_resident_index_serves_what_the_mapped_one_does_and_reads_no_index_page(tmp_path):
    """Under ``index_memory`` the uid index is read into the process at open, so a lookup reads only
    its row: the same answers as the memory-mapped index, and no read-ahead of index blocks."""
    uids, vecs, _, ok = write_features(tmp_path / "f", n=300, shards=3)
    resident, mapped = FeatureStore.open(tmp_path / "f"), FeatureStore.open(tmp_path / "f", index_memory=0)
    assert resident.index_resident and not mapped.index_resident
    assert isinstance(resident._index, np.ndarray) and not isinstance(resident._index.base, mmap.mmap)
    assert resident.memory_bytes == resident._index.nbytes + resident._fence.nbytes == 24 * ok.sum() + resident._fence.nbytes
    assert mapped.memory_bytes == mapped._fence.nbytes and resident.info()["index_resident"]
    np.testing.assert_array_equal(resident._index, mapped._index)
    ask = [uids[i] for i in np.random.default_rng(2).permutation(300)] + ["f" * 32, "not-a-uid"]
    a, b = resident.get(ask, on_missing="mask"), mapped.get(ask, on_missing="mask")
    assert a.found.tolist() == b.found.tolist() == [ok[uids.index(u)] for u in ask[:-2]] + [False, False]
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    assert resident._index_map.mm is None and mapped._index_map.mm is not None  # nothing to read ahead


def test_the_index_is_resident_up_to_the_budget_and_mapped_above_it(tmp_path):
    write_features(tmp_path / "f", n=50)
    size = os.path.getsize(os.path.join(FeatureStore.open(tmp_path / "f").serving_dir, "uid_index.npy"))
    assert FeatureStore.open(tmp_path / "f", index_memory=size).index_resident
    assert not FeatureStore.open(tmp_path / "f", index_memory=size - 1).index_resident
    for bad in (-1, True, 1.5, "1"):
        with pytest.raises(ValueError, match="index_memory"):
            FeatureStore.open(tmp_path / "f", index_memory=bad)


def test_a_truncated_resident_index_is_an_error_naming_its_file(tmp_path):
    write_features(tmp_path / "f")
    index = os.path.join(FeatureStore.open(tmp_path / "f").serving_dir, "uid_index.npy")
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) - 10)
    with pytest.raises(SchemaError, match="uid_index.npy: ends 10 bytes short"):
        FeatureStore.open(tmp_path / "f")


def test_a_reopen_after_adding_shards_holds_the_new_index(tmp_path):
    """A process holding version 1's index in memory keeps serving version 1; a reopen after an
    incremental build holds the new version's index, rows of the new shards included."""
    path = tmp_path / "f"
    all_uids = [uid_for(f"http://x/{i}.jpg") for i in range(80)]
    write_features(path, uids=all_uids[:60], shards=3, failed=())
    first = FeatureStore.open(path)
    uids, vecs, _, _ = write_features(path, uids=all_uids, shards=4, failed=())  # the same 3 shards and a new one
    second = FeatureStore.open(path)
    assert second.index_resident and second._meta["segments_built"] == 1 and second.num_rows == 80
    np.testing.assert_array_equal(second.get(uids[::-1])["embedding"], vecs[::-1])
    assert not first.contains(uids[60:]).any() and not first.is_current()
    np.testing.assert_array_equal(first.get(uids[:60])["embedding"], vecs[:60])


@pytest.mark.parametrize("sort_rows, merge_rows", [(7, 3), (50, 1), (1000, 2)])
def test_an_index_sorted_in_spilled_runs_is_the_one_sorted_whole(tmp_path, monkeypatch, sort_rows, merge_rows):
    """Above ``INDEX_SORT_ROWS`` rows the index is sorted in runs spilled beside it and merged a
    few records a run at a time (at 10M rows: 3 runs of 4M): the same index and fence, byte for
    byte, as one sort in memory, with runs of uids sharing their top 64 bits across runs and blocks."""
    import lmeye.store as store_mod

    rng = np.random.default_rng(5)
    uids = [uid_for(f"http://x/{i}") for i in range(150)] + ["0" * 32, "f" * 32]
    for run in range(6):
        top = rng.bytes(8).hex()
        uids += [top + rng.bytes(8).hex() for _ in range(1 + 2 * run)]
    rng.shuffle(uids)
    monkeypatch.setattr(store_mod, "FENCE_ROWS", 4)
    _, vecs, _, ok = write_features(tmp_path / "whole", uids=uids, shards=5)
    whole = FeatureStore.open(tmp_path / "whole", index_memory=0)
    monkeypatch.setattr(store_mod, "INDEX_SORT_ROWS", sort_rows)
    monkeypatch.setattr(store_mod, "MERGE_ROWS", merge_rows)
    write_features(tmp_path / "runs", uids=uids, shards=5)
    runs = FeatureStore.open(tmp_path / "runs", index_memory=0)
    for name in ("uid_index.npy", "uid_fence.npy"):
        assert open(os.path.join(runs.serving_dir, name), "rb").read() == open(os.path.join(whole.serving_dir, name), "rb").read()
    assert sorted(os.listdir(runs.serving_dir)) == ["meta.json", "uid_fence.npy", "uid_index.npy"]  # no run left
    index = np.asarray(runs._index)
    assert index.size == ok.sum() and (np.diff(index["hi"].astype(float)) >= 0).all()
    np.testing.assert_array_equal(runs._fence, index["hi"][::4])
    served = [u for u, o in zip(uids, ok) if o]
    np.testing.assert_array_equal(runs.get(served)["embedding"], vecs[ok])


def test_a_uid_twice_in_different_sorted_runs_is_an_error_naming_it(tmp_path, monkeypatch):
    import lmeye.store as store_mod

    monkeypatch.setattr(store_mod, "INDEX_SORT_ROWS", 5)
    monkeypatch.setattr(store_mod, "MERGE_ROWS", 2)
    uids = [uid_for(f"http://x/{i}") for i in range(30)]
    uids[27] = uids[2]  # rows 2 and 27: runs 0 and 5
    write_features(tmp_path / "f", uids=uids, failed=())
    with pytest.raises(SchemaError, match=f"uid {uids[2]} appears in more than one successful row"):
        FeatureStore.open(tmp_path / "f")


def test_a_table_with_no_row_served_has_an_empty_index(tmp_path):
    uids, _, _, _ = write_features(tmp_path / "f", n=6, shards=2, failed=range(6))
    for budget in (0, 1 << 30):
        store = FeatureStore.open(tmp_path / "f", index_memory=budget)
        assert store.num_rows == 0 and not store.contains(uids).any()
