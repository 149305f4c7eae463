import json

import pyarrow as pa
import pytest

from lmeye.tables import (
    Manifest, NotATableFolder, OutputNotWritable, TableMismatch, TableReader, TableWriter, ensure_writable,
    fingerprint, overwriting, shard_file,
)
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
    w3 = TableWriter(str(tmp_path), PAIRS, config={"a": 2}, overwrite=True)
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


def _one_row(uid: str = "a") -> pa.Table:
    return pa.table({"uid": [uid], "url": ["http://h/" + uid]})


def test_other_inputs_or_config_refused_unless_overwrite(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={"a": 1}, input_fingerprint="in1")
    w.write("00000.parquet", _one_row(), input_fingerprint="in1")
    w.finalize(["00000.parquet"], stats={})
    old_cfg = fingerprint({"a": 1})
    with pytest.raises(TableMismatch) as err:  # other inputs: one line naming both fingerprints
        TableWriter(str(tmp_path), PAIRS, config={"a": 1}, input_fingerprint="in2")
    msg = str(err.value)
    assert "\n" not in msg and "other inputs" in msg and "in1" in msg and "in2" in msg and "--overwrite" in msg
    with pytest.raises(TableMismatch, match=f"other content config .*config {old_cfg}.*config {fingerprint({'a': 2})}"):
        TableWriter(str(tmp_path), PAIRS, config={"a": 2}, input_fingerprint="in1")
    assert Manifest.load(str(tmp_path)).complete  # the refused runs changed nothing
    assert (tmp_path / shard_file("00000.parquet")).exists()
    with overwriting():  # the CLI's --overwrite
        w2 = TableWriter(str(tmp_path), PAIRS, config={"a": 1}, input_fingerprint="in2")
    w2.write("00000.parquet", _one_row("b"), input_fingerprint="in2")
    w2.write("00001.parquet", _one_row("c"), input_fingerprint="in2")
    m = w2.finalize(["00000.parquet", "00001.parquet"], stats={})
    assert m.replaced_rows == 1 and w2.replaced_rows == 1
    # the same inputs and config again: a plain rerun, nothing to refuse
    assert TableWriter(str(tmp_path), PAIRS, config={"a": 1}, input_fingerprint="in2").is_done("00001.parquet", "in2")


def test_foreign_folder_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "urls.parquet").write_bytes(b"user data")
    (out / "00000.parquet").write_bytes(b"named like a shard")
    with pytest.raises(OutputNotWritable) as err:
        TableWriter(str(out), PAIRS, config={})
    assert str(err.value).startswith(f"{out}: not empty and not a pairs table (no _manifest.json")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "urls.parquet"]
    assert (out / "00000.parquet").read_bytes() == b"named like a shard"
    # a table of another kind is refused too; an empty folder and a stage's own scratch are fine
    (tmp_path / "empty" / "_staging").mkdir(parents=True)
    TableWriter(str(tmp_path / "empty"), PAIRS, config={})
    with pytest.raises(OutputNotWritable, match="holds a pairs table, not a instructions"):
        from schemas.instructions import INSTRUCTIONS
        ensure_writable(str(tmp_path / "empty"), INSTRUCTIONS)


def test_finalize_removes_only_files_a_manifest_listed(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={"a": 1})
    w.write("00000.parquet", _one_row(), input_fingerprint="x")
    w.write("00001.parquet", _one_row("b"), input_fingerprint="x")
    (tmp_path / "notes.parquet").write_bytes(b"a user's file dropped into the table folder")
    (tmp_path / ".00002.parquet.tmp-deadbeef").write_bytes(b"our own leftover temporary")
    w.finalize(["00000.parquet"], stats={})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["_manifest.json", "notes.parquet", shard_file("00000.parquet")]


def test_finished_shard_is_recognised_by_checksum_not_size(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    info = w.write("00000.parquet", _one_row(), input_fingerprint="x")
    assert TableWriter(str(tmp_path), PAIRS, config={}).is_done("00000.parquet", "x")
    shard = tmp_path / shard_file("00000.parquet")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == info.bytes
    assert not TableWriter(str(tmp_path), PAIRS, config={}).is_done("00000.parquet", "x")


def test_shard_file_where_a_table_folder_is_expected(make_pairs):
    path, _ = make_pairs(num_images=2, shards=1)
    shard = next(path.glob("*.parquet"))
    for call in (lambda: TableReader(str(shard), PAIRS), lambda: Manifest.load(str(shard))):
        with pytest.raises(NotATableFolder) as err:
            call()
        assert str(err.value) == (f"{shard}: is a file, not a table folder (a table is the folder holding "
                                  f"_manifest.json; did you mean {path}?)")
