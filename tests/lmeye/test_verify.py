import os

import pyarrow as pa

from lmeye.cli import main
from lmeye.tables import TableWriter, shard_file
from lmeye.verify import verify
from schemas.pairs import PAIRS


def _table(tmp_path, n=3):
    w = TableWriter(str(tmp_path), PAIRS, config={})
    names = [f"{i:05d}.parquet" for i in range(n)]
    for i, name in enumerate(names):
        w.write(name, pa.table({"uid": [str(i)] * 50, "url": [f"http://h/{i}"] * 50}), input_fingerprint="x")
    w.finalize(names, stats={})
    return names


def _flip_a_byte_keeping_size_and_mtime(path):
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_reports_each_mismatch_that_a_metadata_rerun_cannot_see(tmp_path, ray_local):
    names = _table(tmp_path)
    assert verify(str(tmp_path), shards_per_task=1).ok
    _flip_a_byte_keeping_size_and_mtime(tmp_path / shard_file(names[0]))
    (tmp_path / shard_file(names[2])).unlink()
    # a rerun trusts size + version mark: the flipped byte is invisible to it, by design
    rerun = TableWriter(str(tmp_path), PAIRS, config={})
    assert rerun.is_done(names[0], "x") and not rerun.is_done(names[2], "x")
    result = verify(str(tmp_path), shards_per_task=2)
    assert result.shards == 3 and not result.ok
    assert [(m.file, m.problem.split()[0]) for m in result.mismatches] == [
        (f"{tmp_path}/{shard_file(names[0])}", "sha256"), (f"{tmp_path}/{shard_file(names[2])}", "missing")]


def test_verify_command_prints_mismatches_and_exits_1(tmp_path, ray_local, capsys):
    names = _table(tmp_path, n=2)
    assert main(["verify", str(tmp_path)]) == 0
    assert "2 shard(s)" in capsys.readouterr().out
    _flip_a_byte_keeping_size_and_mtime(tmp_path / shard_file(names[1]))
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH {tmp_path}/{shard_file(names[1])}: sha256 " in out and "1 mismatch(es)" in out


def test_verify_of_a_folder_without_manifest_is_one_line(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "_manifest.json: not found" in capsys.readouterr().err
