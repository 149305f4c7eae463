"""The download stage against the loopback demo server: real HTTP, real img2dataset on Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest

from lmeye.cli import main
from lmeye.config import load_config
from lmeye.demo.corpus import write_url_list
from lmeye.tables import OutputNotWritable, TableReader, shard_file
from lmeye.uid import uid_for
from pipelines.download import read_url_list, run
from schemas.pairs import PAIRS, SUCCESS

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def corpus(demo_corpus):
    return demo_corpus


@pytest.fixture
def server(demo_server):
    return demo_server


def _cfg(input_path, output, **overrides):
    base = {"download.input": str(input_path), "download.output": str(output), "ray.num_cpus": 2,
            "download.samples_per_shard": 6, "download.thread_count": 4, "download.timeout": 2,
            "download.image_size": 32}
    base.update(overrides)
    return load_config(None, base)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_url_lists_in_every_format_with_configured_columns(tmp_path, corpus, fmt):
    path = write_url_list(corpus, "http://127.0.0.1:1", tmp_path / f"urls.{fmt}", fmt=fmt,
                          url_col="link", caption_col="text")
    cfg = _cfg(path, tmp_path / "out", **{"download.input_format": fmt, "download.url_col": "link",
                                          "download.caption_col": "text"}).download
    table = read_url_list(str(path), cfg)
    assert table.num_rows == len(corpus.items) + len(corpus.broken)
    assert table["uid"].to_pylist() == [uid_for(u) for u in table["url"].to_pylist()]
    item = corpus.items[0]
    row = table.filter(pa.compute.ends_with(table["url"], "/" + item.name)).to_pylist()[0]
    assert row["caption"] == item.caption


def test_txt_and_gzipped_lists_dedupe_and_empty_urls(tmp_path):
    import gzip

    from pipelines.download import plan_inputs

    urls = ["http://h/a.jpg", "http://h/b.jpg", "http://h/a.jpg", "  ", "http://h/c.jpg"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.txt.gz").write_bytes(gzip.compress("\n".join(urls[:3]).encode()))
    (tmp_path / "in" / "1.txt.gz").write_bytes(gzip.compress("\n".join(urls[2:]).encode()))
    cfg = _cfg(tmp_path / "in", tmp_path / "out", **{"download.input_format": "txt.gz",
                                                     "download.samples_per_shard": 2}).download
    plan = plan_inputs(str(tmp_path / "in"), str(tmp_path / "staging"), cfg)
    # a.jpg twice across files: kept once; the blank line is not a URL at all
    assert plan.counts["duplicate_url"] == 2 and plan.counts["rows"] == 3
    assert [s.name for s in plan.shards] == ["00000.parquet", "00001.parquet"]
    assert [s.rows for s in plan.shards] == [2, 1]


def test_missing_url_column_is_one_line_naming_file_and_columns(tmp_path, capsys):
    bad = tmp_path / "urls.csv"
    bad.write_text("link,text\nhttp://x/a.jpg,a\n")
    rc = main(["download", str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"lmeye download: error: {bad}: no url column 'url' (columns: link, text); "
                   "set download.url_col")


def test_empty_list_gives_empty_table_and_clean_summary(tmp_path):
    empty = tmp_path / "urls.csv"
    empty.write_text("url,caption\n")
    summary = run(_cfg(empty, tmp_path / "pairs"))
    assert summary.ok and summary.rows == 0 and summary.failures == {}
    reader = TableReader(str(tmp_path / "pairs"), PAIRS)
    assert reader.num_rows == 0 and reader.read().schema.names == PAIRS.columns
    assert "rows 0" in summary.render()


def test_unwritable_output_fails_before_any_download(tmp_path, corpus, server):
    urls = write_url_list(corpus, server.base_url, tmp_path / "urls.csv")
    blocker = tmp_path / "file"
    blocker.write_text("")
    server.clear_log()
    with pytest.raises(OutputNotWritable, match="file/pairs: output is not writable"):
        run(_cfg(urls, blocker / "pairs"))
    assert server.requests == []


def test_download_pairs_table_rows_failures_and_rerun(tmp_path, corpus, server, ray_local):
    urls = write_url_list(corpus, server.base_url, tmp_path / "urls.csv")
    good = corpus.items[0].name
    extra = [  # failure kinds the corpus does not cover
        (f"{server.base_url}/slow/6/images/{good}", "timeout"),
        (f"http://127.0.0.1:{_closed_port()}/images/{good}", "refused"),
    ]
    with urls.open("a") as f:
        for url, kind in extra:
            f.write(f"{url},{kind}\n")
    out = tmp_path / "pairs"
    summary = run(_cfg(urls, out))
    assert summary.ok, summary.render()

    table = TableReader(str(out), PAIRS).read()
    input_urls = pa.csv.read_csv(urls)["url"].to_pylist()
    assert sorted(table["url"].to_pylist()) == sorted(input_urls)  # one row per input URL
    assert len(set(table["uid"].to_pylist())) == table.num_rows
    extra_urls = {u for u, _ in extra}
    corpus_rows = [r for r in table.to_pylist() if r["url"] not in extra_urls]
    by_name = {r["url"].rsplit("/", 1)[1]: r for r in corpus_rows}
    ok = {r["url"].rsplit("/", 1)[1] for r in table.to_pylist() if r["status"] == SUCCESS}
    assert ok == set(corpus.good_names())  # successes are exactly the good URLs
    for name in corpus.good_names():
        row = by_name[name]
        assert row["image"][:2] == b"\xff\xd8" and (row["width"], row["height"]) == (32, 32)
        assert row["original_width"] == 48 and len(row["sha256"]) == 64
    reasons = {
        "404": "404", "500": "500", "not_an_image": "decoding", "truncated": "decoding",
    }
    for name, kind in corpus.expected_failures().items():
        row = by_name[name]
        assert row["status"] != SUCCESS and row["image"] is None
        assert reasons[kind] in row["error_message"], (name, row["error_message"])
    failed_extra = {r["caption"]: r for r in table.to_pylist() if r["caption"] in ("timeout", "refused")}
    assert "timed out" in failed_extra["timeout"]["error_message"]
    assert "refused" in failed_extra["refused"]["error_message"].lower()
    assert sum(summary.failures.values()) == len(corpus.broken) + len(extra)

    # A rerun finds every shard finished: nothing is fetched again.
    server.clear_log()
    again = run(_cfg(urls, out))
    assert again.ok and again.shards_done == 0 and again.shards_skipped == summary.shards_done
    assert server.requests == []


def _manifest_shards(out: Path) -> dict:
    try:
        return json.loads((out / "_manifest.json").read_text())["shards"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}


def test_sigkill_partway_then_rerun_resumes_exactly(tmp_path, corpus, server):
    # Slow URLs so the run is still going when two shards are committed.
    urls = tmp_path / "urls.csv"
    rows = [(f"{server.base_url}/slow/0.4/images/{n}", n) for n in corpus.good_names()]
    urls.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    out = tmp_path / "pairs"
    args = [sys.executable, str(REPO / "jobs" / "download.py"),
            "--set", f"download.input={urls}", "--set", f"download.output={out}",
            "--set", "download.samples_per_shard=2", "--set", "download.thread_count=1",
            "--set", "download.image_size=32", "--set", "ray.num_cpus=2"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server.clear_log()
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while len(_manifest_shards(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = _manifest_shards(out)
    assert 2 <= len(finished) < len(rows) / 2, "the kill did not land partway"
    finished_uids = set()
    for name in finished:
        finished_uids |= set(pq.read_table(out / shard_file(name), columns=["uid"])["uid"].to_pylist())

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"already done {len(finished)}" in rerun.stdout

    table = TableReader(str(out), PAIRS).read()
    uids = table["uid"].to_pylist()
    assert sorted(uids) == sorted(uid_for(u) for u, _ in rows)  # every uid exactly once
    assert set(table["status"].to_pylist()) == {SUCCESS}
    fetched = Counter(server.requests)
    for url, _ in rows:
        path = url.split(server.base_url, 1)[1]
        if uid_for(url) in finished_uids:
            assert fetched[path] == 1, f"{path} was downloaded again after its shard was finished"
        else:
            assert fetched[path] >= 1
