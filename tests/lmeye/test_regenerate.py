"""`lmeye regenerate` over pairs -> features, with the extract stage on the tiny demo ViT (in-process Ray).

The module shares one pairs table and two extractions; the tests run in file order, the last one
changes the pairs table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lingcloud_testing import build_pairs_table

from lmeye import clip
from lmeye.cli import main
from lmeye.config import load_config
from lmeye.store import FeatureStore, table_version
from lmeye.tables import Manifest, TableWriter, shard_file
from lmeye.uid import uid_for
from schemas.pairs import PAIRS
from schemas.pairs import SUCCESS as PAIRS_SUCCESS

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _shards(path: Path) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, sha256 recorded in the manifest)."""
    m = json.loads((path / "_manifest.json").read_text())
    return {n: ((path / shard_file(n)).stat().st_mtime_ns, s["sha256"]) for n, s in m["shards"].items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_local):
    """pairs (12 images + 1 corrupt + 1 failed, 3 shards) extracted twice, into features_a and features_b."""
    root = tmp_path_factory.mktemp("regen")
    build_pairs_table(root / "pairs", 12, shards=3, size=40)
    cfg = load_config(None, [f"data.root={root}", f"extract.model={clip.TINY_MODEL}", "extract.pretrained=null"])
    ckpt = clip.ensure_demo_model(cfg.extract)
    sets = [f"extract.model={clip.TINY_MODEL}", f"extract.pretrained={ckpt}", "extract.dtype=float32",
            "extract.batch_size=4", "extract.decode_num_cpus=0.5"]
    for name in ("features_a", "features_b"):
        args = ["extract", str(root / "pairs"), str(root / name)]
        assert main(args + [x for s in sets for x in ("--set", s)]) == 0
    return root


# CPU matrix products round differently with the batch they run in, and Ray Data forms the
# model's batches of extract.batch_size across shard boundaries in arrival order: 1e-7 differences
# in a shard whose rows were batched differently (measured). The fix is in pipelines/extract.py
# (the model actor gets whole blocks, batch_size=None, and forwards them in fixed chunks of
# batch_size): with it this passes; remove the marker when it is merged.
def test_rebuilt_from_scratch_every_shard_checksum_is_identical(made):
    a, b = _shards(made / "features_a"), _shards(made / "features_b")
    assert sorted(a) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert {n: sha for n, (_, sha) in a.items()} == {n: sha for n, (_, sha) in b.items()}
    for name in a:  # the recorded checksum is the file's
        assert (made / "features_a" / shard_file(name)).read_bytes() == (made / "features_b" / shard_file(name)).read_bytes()


def test_up_to_date_recomputes_nothing(made, capsys):
    before = _shards(made / "features_a")
    manifest_before = (made / "features_a" / "_manifest.json").read_bytes()
    assert main(["regenerate", str(made / "features_a")]) == 0
    out = capsys.readouterr().out
    assert "up to date" in out and "nothing recomputed" in out
    assert _shards(made / "features_a") == before
    assert (made / "features_a" / "_manifest.json").read_bytes() == manifest_before  # not even rewritten


def test_changed_config_writes_a_new_version_and_the_old_stays_readable(made, capsys):
    old_dir = made / "features_b"
    old_version = table_version(Manifest.load(str(old_dir)))
    before = _shards(old_dir)
    uids = FeatureStore.open(str(old_dir)).info()["rows_served"]
    assert main(["regenerate", str(old_dir), "--set", "extract.dtype=float16"]) == 0
    out = capsys.readouterr().out
    assert "extract.dtype: 'float32' -> 'float16'" in out and "new version written beside the old one" in out
    [new_dir] = [p for p in made.iterdir() if p.name.startswith("features_b@")]
    new_manifest = Manifest.load(str(new_dir))
    assert new_dir.name == f"features_b@{new_manifest.config_fingerprint}"
    assert new_manifest.metadata["dtype"] == "float16" and new_manifest.provenance["config"]["extract"]["dtype"] == "float16"
    assert _shards(old_dir) == before  # the old version is untouched
    pinned = FeatureStore.open(str(old_dir), version=old_version)
    new = FeatureStore.open(str(new_dir))
    some = pq.read_table(old_dir / shard_file("00000.parquet"), columns=["uid", "status"]).filter(
        pa.compute.equal(pa.compute.field("status"), "success"))["uid"].to_pylist()
    old_emb, new_emb = pinned.get(some)["embedding"], new.get(some)["embedding"]
    assert old_emb.dtype == np.float32 and new_emb.dtype == np.float16 and pinned.info()["rows_served"] == uids
    np.testing.assert_allclose(new_emb.astype(np.float32), old_emb, atol=2e-3)
    # regenerating the new version with its own config again: up to date, no third copy
    assert main(["regenerate", str(new_dir)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert len([p for p in made.iterdir() if p.name.startswith("features_b@")]) == 1


def _rewrite_pairs(pairs: Path) -> set[str]:
    """Shard 00001 loses its first row, shard 00003 is new; returns the success uids afterwards."""
    old = {n: pq.read_table(pairs / shard_file(n)) for n in ("00000.parquet", "00001.parquet", "00002.parquet")}
    writer = TableWriter(str(pairs), PAIRS, config={"fixture": "pairs", "seed": 0})  # same config: shards kept
    writer.write("00001.parquet", old["00001.parquet"].slice(1))
    extra = old["00000.parquet"].slice(0, 3)
    urls = [f"http://127.0.0.1/extra/{i}.jpg" for i in range(extra.num_rows)]
    extra = extra.set_column(0, "uid", pa.array([uid_for(u) for u in urls])).set_column(1, "url", pa.array(urls))
    writer.write("00003.parquet", extra.cast(PAIRS.schema))
    names = ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    writer.finalize(names, stats={})
    table = pa.concat_tables(pq.read_table(pairs / shard_file(n)) for n in names)
    return {u for u, s in zip(table["uid"].to_pylist(), table["status"].to_pylist()) if s == PAIRS_SUCCESS}


def test_changed_and_added_input_shards_recompute_only_their_shards(made, capsys):
    feats = made / "features_a"
    before = _shards(feats)
    success = _rewrite_pairs(made / "pairs")
    assert main(["regenerate", str(feats), "--dry-run"]) == 0
    assert "input pairs" in capsys.readouterr().out
    assert main(["regenerate", str(feats)]) == 0
    out = capsys.readouterr().out
    assert "shards written 2, already done 2" in out
    after = _shards(feats)
    assert sorted(after) == ["00000.parquet", "00001.parquet", "00002.parquet", "00003.parquet"]
    for name in ("00000.parquet", "00002.parquet"):  # derived from unchanged shards: not rewritten
        assert after[name] == before[name]
    assert after["00001.parquet"][1] != before["00001.parquet"][1]
    uids = pa.concat_tables(pq.read_table(feats / shard_file(n), columns=["uid"]) for n in after)["uid"].to_pylist()
    assert len(uids) == len(set(uids)) and set(uids) == success
    assert main(["regenerate", str(feats)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_a_table_without_a_recorded_run_is_one_line(tmp_path, capsys):
    build_pairs_table(tmp_path / "pairs", 2, shards=1)  # written outside any stage: no provenance
    assert main(["regenerate", str(tmp_path / "pairs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no stage run" in err
