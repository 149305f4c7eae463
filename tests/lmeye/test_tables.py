import json

import pyarrow as pa
import pytest

from lmeye.tables import (
    JOURNAL, MANIFEST, Manifest, NotATableFolder, OutputNotWritable, TableMismatch, TableReader, TableWriter,
    ensure_writable, fingerprint, open_table, overwriting, shard_file,
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


def test_finished_shard_is_recognised_by_version_mark_not_size(tmp_path):
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


def test_a_commit_appends_one_journal_line_not_the_manifest(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    for i in range(3):
        w.write(f"{i:05d}.parquet", _one_row(str(i)), input_fingerprint="x")
    before = (tmp_path / MANIFEST).read_bytes()
    w.write("00003.parquet", _one_row("d"), input_fingerprint="x")
    assert (tmp_path / MANIFEST).read_bytes() == before  # untouched by the commit
    [log] = (tmp_path / JOURNAL).iterdir()
    assert [json.loads(line)["name"] for line in log.read_text().splitlines()] == [f"{i:05d}.parquet" for i in range(4)]
    assert json.loads(before)["shards"] == {}
    w.finalize([f"{i:05d}.parquet" for i in range(4)], stats={})
    assert not (tmp_path / JOURNAL).exists()  # compacted into the manifest
    assert sorted(json.loads((tmp_path / MANIFEST).read_text())["shards"]) == [f"{i:05d}.parquet" for i in range(4)]


def test_object_store_layout_one_object_a_commit_reads_back_the_same(tmp_path):
    """Object stores cannot append: one object per commit, read back by one listing."""
    from lmeye import journal
    from lmeye.tables import LocalFileSystem

    fs = LocalFileSystem(auto_mkdir=True)
    records = [{"name": f"{i:05d}.parquet", "rows": i} for i in range(3)]
    for r in records:
        journal.append(fs, str(tmp_path), "e1", r, appendable=False)
    journal.append(fs, str(tmp_path), "e0", {"name": "old.parquet"}, appendable=False)
    assert sorted(p.name for p in (tmp_path / JOURNAL / "e1").iterdir()) == [f"{r['name']}.json" for r in records]
    assert journal.read(fs, str(tmp_path), "e1", "T") == records
    journal.clear(fs, str(tmp_path))
    assert journal.read(fs, str(tmp_path), "e1", "T") == [] and not (tmp_path / JOURNAL).exists()


def test_a_crash_between_commit_and_compaction_loses_nothing(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={"a": 1})
    infos = [w.write(f"{i:05d}.parquet", _one_row(str(i)), input_fingerprint="x") for i in range(2)]
    del w  # the driver dies: no finalize, no compaction
    loaded = Manifest.load(str(tmp_path))
    assert {n: s.sha256 for n, s in loaded.shards.items()} == {i.name: i.sha256 for i in infos}
    assert not loaded.complete
    reader = open_table(str(tmp_path), PAIRS, allow_incomplete=True)
    assert reader.num_rows == 2 and reader.shard_names == [i.name for i in infos]
    rerun = TableWriter(str(tmp_path), PAIRS, config={"a": 1})
    assert all(rerun.is_done(i.name, "x") for i in infos)  # resumed, nothing redone
    assert not (tmp_path / JOURNAL).exists()  # the rerun's opening compaction absorbed the journal
    rerun.finalize([i.name for i in infos], stats={})
    assert open_table(str(tmp_path), PAIRS).num_rows == 2


def test_journal_entries_of_an_older_epoch_are_ignored(tmp_path):
    """A crash after a compaction's manifest write but before its journal was removed: the
    leftover entries (here, of a shard finalize dropped) must not come back."""
    w = TableWriter(str(tmp_path), PAIRS, config={})
    w.write("00000.parquet", _one_row("a"), input_fingerprint="x")
    w.write("00001.parquet", _one_row("b"), input_fingerprint="x")
    leftovers = {p.name: p.read_bytes() for p in (tmp_path / JOURNAL).iterdir()}
    w.finalize(["00000.parquet"], stats={})
    (tmp_path / JOURNAL).mkdir()
    for name, data in leftovers.items():
        (tmp_path / JOURNAL / name).write_bytes(data)
    m = Manifest.load(str(tmp_path))
    assert sorted(m.shards) == ["00000.parquet"] and m.complete


def test_a_torn_last_journal_line_is_a_commit_that_never_returned(tmp_path):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    w.write("00000.parquet", _one_row("a"), input_fingerprint="x")
    [log] = (tmp_path / JOURNAL).iterdir()
    with log.open("a") as f:
        f.write('{"name": "00001.par')  # killed mid-write
    assert sorted(Manifest.load(str(tmp_path)).shards) == ["00000.parquet"]
    log.write_text('{"name": "00000.par\n' + log.read_text())  # damage before the last line: an error
    with pytest.raises(SchemaError, match=f"{JOURNAL}/{log.name}, line 1: unreadable journal entry"):
        Manifest.load(str(tmp_path))


def test_is_done_reads_metadata_not_the_shards(tmp_path, monkeypatch):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    names = [f"{i:05d}.parquet" for i in range(3)]
    for i, n in enumerate(names):
        w.write(n, _one_row(str(i)), input_fingerprint="x")
    w.finalize(names, stats={})
    rerun = TableWriter(str(tmp_path), PAIRS, config={})
    opened, listed = [], []
    real_open, real_ls = rerun.fs.open, rerun.fs.ls
    monkeypatch.setattr(rerun.fs, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    monkeypatch.setattr(rerun.fs, "ls", lambda p, *a, **k: listed.append(p) or real_ls(p, *a, **k))
    assert all(rerun.is_done(n, "x") for n in names)
    assert opened == [] and len(listed) == 1  # one folder listing, no shard read
