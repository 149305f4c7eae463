"""pipelines.instruct.join: image references resolved by a partitioned join with the pairs table,
in input order, with nothing on the driver that grows with the pairs table."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lmeye.config import load_config
from lmeye.tables import Manifest, TableReader, TableWriter
from lmeye.uid import uid_for
from pipelines.instruct import run
from pipelines.instruct.join import PairsIndex, Resolver, key_partitions, partition_count
from schemas.instructions import INSTRUCTIONS
from schemas.pairs import PAIRS


def _pairs(path, urls_status: list[tuple[str, str]]) -> TableReader:
    rows = [dict(uid=uid_for(u), url=u, caption="c", status=s, error_message=None, width=None, height=None,
                 original_width=None, original_height=None, sha256=None, image=None) for u, s in urls_status]
    writer = TableWriter(str(path), PAIRS, config={"test": "join"})
    writer.write("00000.parquet", pa.Table.from_pylist(rows, schema=PAIRS.with_metadata(PAIRS.schema)))
    writer.finalize(["00000.parquet"], stats={})
    return TableReader(str(path), PAIRS)


def test_records_resolve_in_input_order_across_partitions(tmp_path):
    urls = [(f"http://h/a/{i}.jpg", "success") for i in range(40)]
    urls += [("http://h/b/7.jpg", "success"),  # 7.jpg under two folders: ambiguous by basename
             ("http://h/a/failed.jpg", "failed_to_download")]
    pairs = _pairs(tmp_path / "pairs", urls)
    index = PairsIndex(pairs, "basename", 2, str(tmp_path), partitions=5, chunk_rows=8)
    assert len({int(p) for p in key_partitions([f"{i}.jpg" for i in range(40)], 5)}) == 5  # really spread
    resolver = Resolver(index, str(tmp_path), "s", chunk_rows=4)
    refs = [f"{i}.jpg" for i in reversed(range(40))] + ["7.jpg", "failed.jpg", "nowhere.jpg", None]
    for seq, ref in enumerate(refs):
        resolver.add(seq, ref, "f.json", f"record {seq}", {"image": ref, "n": seq})
    got = list(resolver.resolved())
    assert [seq for seq, _ in got] == list(range(len(refs)))  # input order, whatever the partitions
    assert [r.rec["n"] for _, r in got] == list(range(len(refs)))
    by_ref = {r.rec["image"]: r for _, r in got}
    assert by_ref["12.jpg"].uid == uid_for("http://h/a/12.jpg") and by_ref["12.jpg"].reason is None
    assert by_ref["7.jpg"].reason == "ambiguous_image" and by_ref["7.jpg"].uid is None
    assert by_ref["failed.jpg"].reason == "image_failed"
    assert by_ref["nowhere.jpg"].reason == "image_not_in_pairs"
    assert by_ref[None].uid is None and by_ref[None].reason is None  # text-only: no image, no lookup
    assert not list(tmp_path.glob("pending-*")) and not list(tmp_path.glob("ranges-*"))  # consumed


def test_the_stage_gives_the_same_table_with_one_partition_or_many(tmp_path, make_pairs):
    """The join's partition count (from partition_mb) changes nothing in the output: rows, ids,
    order-sensitive choices (cap, first duplicate wins) and the accounting."""
    _, pairs = make_pairs(num_images=12)
    names = [u.rsplit("/", 1)[-1] for u in pairs["url"].to_pylist()]
    recs = [{"image": names[i % len(names)], "question": f"q{i % 9}", "answer": "a", "id": i} for i in range(60)]
    recs.append({"image": "nowhere.jpg", "question": "q", "answer": "a"})
    src = tmp_path / "vqa.json"
    src.write_text(json.dumps(recs))
    # the join's partitions for these sizes, as the stage's spill task computes them (rows.SourceContext)
    used = [partition_count(pairs.num_rows, src.stat().st_size, mb) for mb in (64, 0.0005)]

    def build(out: str, partition_mb: float) -> tuple[list, dict]:
        cfg = load_config(None, {"data.root": str(tmp_path), "instruct.output": str(tmp_path / out),
                                 "instruct.require_features": False, "instruct.partition_mb": partition_mb,
                                 "instruct.chunk_rows": 7,
                                 "instruct.sources": [{"kind": "vqa", "path": str(src), "cap": 40}]})
        run(cfg)
        table = TableReader(cfg.instruct.output, INSTRUCTIONS).read()
        return sorted(table.to_pylist(), key=lambda r: r["sample_id"]), Manifest.load(cfg.instruct.output).stats["sources"]

    one_rows, one_stats = build("one", 64)
    many_rows, many_stats = build("many", 0.0005)  # ~500 bytes a partition: both sides spread over many
    assert used[0] == 1 and used[1] > 4
    assert many_rows == one_rows and many_stats == one_stats
    # every 14th record names missing_0.jpg (a failed download): 56 candidates, the first 40 kept
    assert one_stats["vqa"]["rejected"] == {"image_failed": 4, "image_not_in_pairs": 1}
    assert one_stats["vqa"]["over_cap"] == 16


@pytest.mark.parametrize("partitions", [1, 3])
def test_the_index_holds_one_row_per_key(tmp_path, partitions):
    pairs = _pairs(tmp_path / "pairs", [("http://h/x/1.jpg", "success"), ("http://h/y/1.jpg", "failed_to_download"),
                                        ("http://h/x/2.jpg", "success")])
    index = PairsIndex(pairs, "basename", 2, str(tmp_path), partitions=partitions, chunk_rows=2)
    values = pa.concat_tables([index.values(p) for p in range(partitions)]).to_pylist()
    got = {v["key"]: (v["value"], v["ambiguous"]) for v in values}
    assert got["2.jpg"] == (uid_for("http://h/x/2.jpg"), False)
    assert got["1.jpg"][1] is True  # a success and a failure under one name: ambiguous
