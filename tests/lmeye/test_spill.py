"""lmeye.spill: rows go to the partition the caller chose and keep their order there."""

import numpy as np
import pyarrow as pa

from lmeye.spill import Spill

SCHEMA = pa.schema([("key", pa.string()), ("seq", pa.int64())])


def test_rows_land_in_their_partition_in_the_order_written(tmp_path):
    spill = Spill(str(tmp_path), "t", 3, SCHEMA)
    seq = 0
    for keys in (["a", "b", "c", "a"], ["c", "a"], []):
        parts = np.array([ord(k) % 3 for k in keys], dtype=np.int64)
        spill.write(pa.table({"key": keys, "seq": list(range(seq, seq + len(keys)))}, schema=SCHEMA), parts)
        seq += len(keys)
    spill.close()
    got = {p: spill.read(p).to_pydict() for p in range(3)}
    assert got[ord("a") % 3] == {"key": ["a", "a", "a"], "seq": [0, 3, 5]}
    assert got[ord("b") % 3] == {"key": ["b"], "seq": [1]}
    assert got[ord("c") % 3] == {"key": ["c", "c"], "seq": [2, 4]}
    assert spill.rows == 6


def test_an_empty_partition_reads_as_empty_and_removal_frees_it(tmp_path):
    spill = Spill(str(tmp_path), "t", 4, SCHEMA)
    spill.write(pa.table({"key": ["x"], "seq": [7]}, schema=SCHEMA), np.array([2]))
    spill.close()
    assert spill.read(0).num_rows == 0 and spill.size(0) == 0
    assert spill.size(2) > 0
    assert [b.num_rows for b in spill.batches(2)] == [1]
    spill.remove(2)
    assert spill.size(2) == 0 and spill.read(2).num_rows == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []
