import json

import pyarrow as pa
import pytest

from lmeye.tables import Manifest, OutputNotWritable, TableReader, TableWriter, ensure_writable, shard_file
from schemas import SchemaError
from schemas.pairs import PAIRS


def test_fixture_table_roundtrip(make_pairs):
    path, table = make_pairs(num_images=6, shards=3)
    reader = TableReader(str(path), PAIRS)
    assert reader.num_rows == table.num_rows == 8
    assert len(reader.files) == 3
    back = reader.read()
    assert back["uid"].to_pylist() == table["uid"].to_pylist()
    manifest = json.loads((path / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["schema_version"] == PAIRS.version
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"].values())
    assert not list(path.glob(".*tmp*"))


def test_rerun_keeps_done_shards_and_config_change_makes_them_stale(tmp_path):
    t = PAIRS.empty()
    w = TableWriter(str(tmp_path), PAIRS, config={"a": 1})
    w.write("00000.parquet", t, input_fingerprint="x")
    w2 = TableWriter(str(tmp_path), PAIRS, config={"a": 1})
    assert w2.is_done("00000.parquet", "x")
    assert not w2.is_done("00000.parquet", "y")  # its input changed
    w3 = TableWriter(str(tmp_path), PAIRS, config={"a": 2})
    assert not w3.is_done("00000.parquet", "x")
    assert w3.stale == {"00000.parquet"}
    w3.finalize([], stats={})
    assert not (tmp_path / shard_file("00000.parquet")).exists()


def test_reader_names_file_and_column(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    w.write("00000.parquet", pa.table({"uid": ["a"], "url": ["u"]}))
    w.finalize(["00000.parquet"], stats={})
    with pytest.raises(SchemaError, match=r"00000\.parquet: pairs table is missing column 'caption'"):
        TableReader(str(tmp_path), PAIRS).read()


def test_reader_checks_version_and_completeness(tmp_path):
    with pytest.raises(SchemaError, match="_manifest.json: not found"):
        TableReader(str(tmp_path), PAIRS)
    w = TableWriter(str(tmp_path), PAIRS, config={})
    with pytest.raises(SchemaError, match="incomplete"):
        TableReader(str(tmp_path), PAIRS)
    m = Manifest.load(str(tmp_path))
    m.schema_version = 99
    m.complete = True
    m.save(str(tmp_path))
    with pytest.raises(SchemaError, match=f"schema version 99, this code reads version {PAIRS.version}"):
        TableReader(str(tmp_path), PAIRS)
    del w


def test_unwritable_output_fails_early(tmp_path):
    # A path below a regular file can never be created, whoever runs the test (root included).
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    with pytest.raises(OutputNotWritable, match="blocker/out: output is not writable"):
        ensure_writable(str(blocker / "out"))
