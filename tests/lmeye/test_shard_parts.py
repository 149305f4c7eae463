"""Shards written by the workers from parts (lmeye/shard_parts.py), without Ray: the functions
the pipeline runs on workers and the driver's ledger."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmeye.shard_parts import PART_SCHEMA, PartCollector, assemble_shard, write_parts
from lmeye.tables import TableReader, TableWriter, shard_file
from schemas.pairs import PAIRS

SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string())])


def _stats(part):
    return {"by_status": {"success": part.num_rows}, "nodes": {n: 1 for n in part["_node"].to_pylist()}}


def _block(rows):
    return pa.table({"uid": [u for u, _ in rows], "url": [f"http://h/{u}" for u, _ in rows],
                     "_shard": [s for _, s in rows], "_node": ["n1"] * len(rows)})


def test_parts_become_shards_with_the_rows_in_order_and_summed_stats(tmp_path):
    staging = str(tmp_path / "t" / "_staging" / "parts")
    blocks = [_block([("a", "00000.parquet"), ("x", "00001.parquet"), ("b", "00000.parquet")]),
              _block([("y", "00001.parquet"), ("c", "00000.parquet")])]
    collector = PartCollector({"00000.parquet": 3, "00001.parquet": 2})
    done = []
    for block in blocks:
        parts = write_parts(block, staging=staging, shard_col="_shard", schema=SCHEMA, stats_of=_stats)
        assert parts.schema == PART_SCHEMA  # the only thing that reaches the driver: no row data
        done += collector.add(parts)
    assert sorted(done) == ["00000.parquet", "00001.parquet"] and collector.short() == {}
    writer = TableWriter(str(tmp_path / "t"), PAIRS, config={})
    for name in done:
        paths, stats = collector.take(name)
        info = assemble_shard(str(tmp_path / "t"), name, SCHEMA, paths, row_group_rows=2, inputs=[name],
                              input_fingerprint="in", stats=stats)
        writer.record(info)
        assert not any((tmp_path / p.split("://")[-1]).exists() for p in paths)  # parts removed
    t0 = pq.read_table(tmp_path / "t" / shard_file("00000.parquet"))
    assert t0["uid"].to_pylist() == ["a", "b", "c"]
    assert pq.ParquetFile(tmp_path / "t" / shard_file("00000.parquet")).metadata.num_row_groups == 2
    info = writer.manifest.shards["00000.parquet"]
    assert info.rows == 3 and info.stats == {"by_status": {"success": 3}, "nodes": {"n1": 2}}
    assert info.input_fingerprint == "in" and writer.is_done("00000.parquet", "in")


def test_more_rows_than_expected_is_an_error_naming_the_shard(tmp_path):
    collector = PartCollector({"00000.parquet": 1})
    parts = write_parts(_block([("a", "00000.parquet"), ("b", "00000.parquet")]), staging=str(tmp_path),
                        shard_col="_shard", schema=SCHEMA, stats_of=_stats)
    with pytest.raises(RuntimeError, match="00000.parquet: got 2 rows, expected 1"):
        collector.add(parts)


def test_a_shard_short_of_rows_is_reported_and_not_assembled(tmp_path):
    collector = PartCollector({"00000.parquet": 3})
    parts = write_parts(_block([("a", "00000.parquet")]), staging=str(tmp_path), shard_col="_shard",
                        schema=SCHEMA, stats_of=_stats)
    assert collector.add(parts) == [] and collector.short() == {"00000.parquet": (1, 3)}
    assert json.loads(parts["stats"][0].as_py())["by_status"] == {"success": 1}
