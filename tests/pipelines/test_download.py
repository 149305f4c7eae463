"""The download stage against the loopback demo server: real HTTP, real img2dataset on Ray."""

from __future__ import annotations

import json
import os
import re
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
from lmeye.tables import Manifest, OutputNotWritable, TableReader, shard_file
from schemas import SchemaError
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
        return Manifest.load(str(out)).shards  # with the shards committed to its journal
    except (AttributeError, SchemaError):  # no manifest yet, or one being written
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


# ----------------------------------------------------------------------------- security


def test_guarded_opener_fetches_http_only_and_caps_bodies(server):
    import urllib.error

    from pipelines.download import ResponseTooLarge, guarded_opener

    opener = guarded_opener(limit=10_000)
    with opener.open(f"{server.base_url}/big/10000", timeout=5) as r:
        assert len(r.read()) == 10_000  # exactly the cap: fine
    for tail in ("big/10001", "big/10001/unsized", "big/4000000000/unsized"):  # by header, then by reading
        with pytest.raises(ResponseTooLarge, match="response_too_large"):
            with opener.open(f"{server.base_url}/{tail}", timeout=5) as r:
                r.read()
    for url in ("file:///etc/passwd", "data:text/plain;base64,aGk=", "ftp://127.0.0.1/x"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            opener.open(url, timeout=5)


def test_non_http_urls_become_failed_rows_and_are_never_fetched(tmp_path, corpus, server, ray_local):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    good = f"{server.base_url}/images/{corpus.items[0].name}"
    rows = [
        (good, "good"),
        (f"file://{secret}", "existing local file"),
        (f"file://{tmp_path}/missing.txt", "missing local file"),
        ("data:image/png;base64,iVBORw0KGgo=", "data url"),
        ("ftp://127.0.0.1/x.jpg", "ftp"),
        (f"{server.base_url}/big/200000", "big, sized"),
        (f"{server.base_url}/big/200000/unsized", "big, unsized"),
    ]
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in rows))
    out = tmp_path / "pairs"
    summary = run(_cfg(urls, out, **{"download.disable_all_reencoding": True,
                                      "download.max_response_bytes": 100_000}))
    assert summary.ok, summary.render()
    table = {r["caption"]: r for r in TableReader(str(out), PAIRS).read().to_pylist()}
    assert set(table) == {c for _, c in rows}  # every input row is in pairs, with its status
    assert table["good"]["status"] == SUCCESS
    local = [table[c] for c in ("existing local file", "missing local file", "data url", "ftp")]
    for row in local:
        assert row["status"] == "failed_to_download" and row["image"] is None
        assert row["error_message"].startswith("unsupported_url_scheme")
    # the message says nothing about whether the local path exists
    assert local[0]["error_message"] == local[1]["error_message"]
    for c in ("big, sized", "big, unsized"):
        assert table[c]["status"] == "failed_to_download"
        assert table[c]["error_message"].startswith("response_too_large")
    assert summary.counts["unsupported_url_scheme"] == 4
    assert not any("secret" in p or "missing" in p for p in server.requests)


# ----------------------------------------------------------------------------- never delete user files


def _scheme_only_list(path: Path, n: int) -> Path:
    """URLs that are never fetched: the stage writes their rows itself, so no Ray is needed."""
    path.write_text("url,caption\n" + "".join(f"ftp://example.invalid/{i}.jpg,c{i}\n" for i in range(n)))
    return path


def test_foreign_output_folder_is_refused_and_its_files_kept(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    urls = _scheme_only_list(folder / "urls.csv", 3)
    (folder / "urls.parquet").write_bytes(b"the user's own parquet")
    (folder / "00000.parquet").write_bytes(b"named like a shard")
    rc = main(["download", str(urls), str(folder)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(f"lmeye download: error: {folder}: not empty and not a pairs table")
    assert sorted(p.name for p in folder.iterdir()) == ["00000.parquet", "urls.csv", "urls.parquet"]
    assert (folder / "00000.parquet").read_bytes() == b"named like a shard"


def test_rerun_with_other_list_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "pairs"
    first = _scheme_only_list(tmp_path / "a.csv", 3)
    assert main(["download", str(first), str(out)]) == 0
    second = _scheme_only_list(tmp_path / "b.csv", 1)
    capsys.readouterr()
    assert main(["download", str(second), str(out)]) == 2
    err = capsys.readouterr().err
    old_fp = json.loads((out / "_manifest.json").read_text())["input_fingerprint"]
    assert err.count("\n") == 1 and "built from other inputs" in err and "--overwrite" in err
    assert re.search(rf"table: config \w+, inputs {old_fp}; this run: config \w+, inputs (?!{old_fp})\w+", err)
    assert TableReader(str(out), PAIRS).num_rows == 3  # untouched
    assert main(["download", str(second), str(out), "--overwrite"]) == 0
    assert "--overwrite: replaced 3 row(s)" in capsys.readouterr().out
    assert TableReader(str(out), PAIRS).num_rows == 1
    assert not (out / "_staging").exists()


def test_failed_run_leaves_no_staging_or_empty_folder(tmp_path):
    bad = tmp_path / "urls.csv"
    bad.write_text("link\nhttp://x/a.jpg\n")
    out = tmp_path / "pairs"
    with pytest.raises(Exception, match="no url column"):
        run(_cfg(bad, out))
    assert not out.exists()
    out.mkdir()  # an existing (empty) folder is kept, without scratch
    with pytest.raises(Exception, match="no url column"):
        run(_cfg(bad, out))
    assert out.exists() and list(out.iterdir()) == []


def test_pass_error_keeps_its_traceback_in_log_and_manifest(tmp_path, monkeypatch, capsys):
    import pipelines.download as download

    def broken(*args, **kwargs):
        raise TypeError("download() got an unexpected keyword argument 'bogus'")

    monkeypatch.setattr(download, "_call_img2dataset", broken)
    monkeypatch.setattr(download, "init_ray", lambda cfg: None)
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    summary = run(_cfg(urls, tmp_path / "pairs", **{"download.max_shard_retry": 1}))
    assert not summary.ok
    err = capsys.readouterr().err
    assert err.count("Traceback (most recent call last)") == 2 and "unexpected keyword argument 'bogus'" in err
    stats = json.loads((tmp_path / "pairs" / "_manifest.json").read_text())["stats"]
    assert len(stats["pass_errors"]) == 2 and "TypeError" in stats["pass_errors"][0]
    assert "in broken" in stats["pass_errors"][0]  # the frame that raised, not just a note
    assert not (tmp_path / "pairs" / "_staging").exists()


# ----------------------------------------------------------------------------- usability


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "json", "txt", "csv.gz", "parquet.gz"])
def test_input_format_is_inferred_from_the_extension(tmp_path, fmt):
    import gzip

    from pipelines.download import plan_inputs

    base = fmt.removesuffix(".gz")
    urls = [f"http://h/{i}.jpg" for i in range(5)]
    path = tmp_path / f"urls.{base}"
    if base in ("csv", "tsv", "jsonl", "parquet"):
        write_url_list_plain = pa.table({"url": urls, "caption": [f"c{i}" for i in range(5)]})
        if base == "parquet":
            pq.write_table(write_url_list_plain, path)
        elif base == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in write_url_list_plain.to_pylist()))
        else:
            sep = "\t" if base == "tsv" else ","
            path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}c{i}\n" for i, u in enumerate(urls)))
    elif base == "json":
        path.write_text(json.dumps([{"url": u, "caption": "x"} for u in urls]))
    else:
        path.write_text("\n".join(urls))
    if fmt.endswith(".gz"):
        gz = tmp_path / f"urls.{fmt}"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        path = gz
    cfg = _cfg(path, tmp_path / "out").download
    assert cfg.input_format is None  # the default: infer
    plan = plan_inputs(str(path), str(tmp_path / "staging"), cfg)
    assert plan.input_format == fmt and plan.format_inferred and plan.counts["rows"] == 5


def test_uninferable_or_mixed_inputs_are_one_line(tmp_path, capsys):
    odd = tmp_path / "urls.dat"
    odd.write_text("http://h/a.jpg\n")
    assert main(["download", str(odd), str(tmp_path / "o1")]) == 2
    assert "urls.dat: cannot tell the URL list's format from its extension" in capsys.readouterr().err
    mixed = tmp_path / "in"
    mixed.mkdir()
    (mixed / "a.csv").write_text("url\nhttp://h/a.jpg\n")
    (mixed / "b.txt").write_text("http://h/b.jpg\n")
    assert main(["download", str(mixed), str(tmp_path / "o2")]) == 2
    assert "folder mixes csv, txt; set download.input_format" in capsys.readouterr().err


def test_summary_says_which_input_format_was_used(tmp_path):
    urls = _scheme_only_list(tmp_path / "urls.csv", 2)
    summary = run(_cfg(urls, tmp_path / "pairs"))
    assert "input format csv (inferred from the file extension)" in summary.render()
    again = run(_cfg(urls, tmp_path / "pairs", **{"download.input_format": "csv"}))
    assert again.ok and again.shards_skipped == 1  # the same table: configured or inferred alike
    assert "input format csv (download.input_format)" in again.render()


def test_interpolation_names_are_checked_at_config_load():
    from lmeye.config import ConfigError

    with pytest.raises(ConfigError, match="downscale_interpolation"):
        load_config(None, {"download.downscale_interpolation": "lanczoz"})


# ----------------------------------------------------------------------------- scale


def test_streaming_plan_dedupes_across_partitions_and_is_deterministic(tmp_path, monkeypatch):
    import pipelines.download as download

    monkeypatch.setattr(download, "PARTITION_BYTES", 2_000)  # force many spill partitions
    urls = [f"http://h/{i % 700}.jpg" for i in range(1000)] + ["file:///etc/passwd", ""]
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    cfg = _cfg(path, tmp_path / "out", **{"download.samples_per_shard": 64}).download
    a = download.plan_inputs(str(path), str(tmp_path / "s1"), cfg)
    b = download.plan_inputs(str(path), str(tmp_path / "s2"), cfg)
    assert a.counts["duplicate_url"] == 300 and a.counts["rows"] == 701
    assert a.counts["unsupported_url_scheme"] == 1 and len(a.rejected) == 1
    assert [(s.name, s.fingerprint) for s in a.all_shards] == [(s.name, s.fingerprint) for s in b.all_shards]
    fetched = pa.concat_tables(pq.read_table(f) for f in a.files)
    assert sorted(fetched["uid"].to_pylist()) == sorted({uid_for(u) for u in urls if u.startswith("http")})
    assert fetched.num_rows == sum(s.rows for s in a.shards)


def test_ctrl_c_during_the_download_exits_130_with_one_line(tmp_path, corpus, server):
    # Ctrl-C reaches the whole foreground process group: the driver and img2dataset's helpers.
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{server.base_url}/slow/3/images/{n},x\n" for n in corpus.good_names()))
    out = tmp_path / "pairs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    server.clear_log()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmeye.cli", "download", str(urls), str(out), "--set", "download.samples_per_shard=2",
         "--set", "download.thread_count=1", "--set", "ray.num_cpus=2"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not server.requests and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert server.requests, "the download never started"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted; rerun the same command to resume" in stderr.splitlines()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert (out / "_manifest.json").exists() and not (out / "_staging").exists()


def test_the_committer_lists_the_raw_folder_once_whatever_is_pending(tmp_path, monkeypatch):
    """Before a pass: one listing, not 2-3 existence calls per pending shard."""
    from collections import Counter as Calls

    from lmeye.tables import TableWriter
    from pipelines.download import Committer, Plan, PlannedShard, ShardTarget

    shards = [PlannedShard(i, f"{i:05d}.parquet", 10, f"fp{i}", ["in.csv"]) for i in range(200)]
    plan = Plan(files=[], shards=shards, rejected=[], counts=Counter(), oom_shard_count=5,
                input_format="csv", format_inferred=True)
    writer = TableWriter(str(tmp_path / "pairs"), PAIRS, config={})
    raw = tmp_path / "raw"
    raw.mkdir()
    committer = Committer(writer, ShardTarget(str(tmp_path / "pairs"), str(raw), "jpg"), plan)
    calls: Calls = Calls()
    for op in ("exists", "isfile", "ls", "size", "cat_file"):  # (a local ls stats the folder itself)
        real = getattr(committer.fs, op)
        monkeypatch.setattr(committer.fs, op, lambda *a, _op=op, _real=real, **k: calls.update([_op]) or _real(*a, **k))
    assert committer.leftovers() == []
    committer.prepare(plan)
    assert calls == {"ls": 2} and len(committer.pending) == 200


def _task_that(tmp_path, ray_local):
    @ray_local.remote
    def task(name: str, delay: float, fail: bool = False, gate: str | None = None):
        time.sleep(delay)
        while gate is not None and not os.path.exists(gate):  # held until the test opens the gate
            time.sleep(0.05)
        if fail:
            raise OSError(f"{name}: the node went away")
        (tmp_path / name).write_text("written")  # what a download task's shard write stands for
        return name

    return task


def test_a_failed_task_lets_the_rest_of_its_pass_finish_before_the_pass_fails(tmp_path, ray_local):
    from pipelines.download import run_tasks

    task = _task_that(tmp_path, ray_local)
    got = []
    with pytest.raises(ray_local.exceptions.RayTaskError, match="the node went away"):
        run_tasks([task.remote("bad", 0, fail=True), task.remote("slow", 2.0)], got.append)
    assert got == ["slow"] and (tmp_path / "slow").exists()  # no task of the pass outlives it


def test_a_pass_that_fails_cancels_its_tasks_before_the_retry(tmp_path, ray_local):
    """Before: the retry pass started while the failed pass's tasks still ran (two writers of a shard)."""
    from pipelines.download import run_tasks

    task = _task_that(tmp_path, ray_local)
    gate = tmp_path / "gate"
    # "held" cannot end before the gate opens, so "fast" is the first result on any machine
    # (a fixed sleep let a loaded CI worker finish it first, and nothing was left to cancel).
    held = task.remote("held", 0, gate=str(gate))

    def recording_fails(_result):
        raise OSError("the journal's disk is full")

    try:
        with pytest.raises(OSError, match="disk is full"):
            run_tasks([task.remote("fast", 0), held], recording_fails)
        ready, _ = ray_local.wait([held], timeout=0)
        assert ready == [held]  # ended (cancelled) by the time the pass returned
        with pytest.raises(ray_local.exceptions.TaskCancelledError):
            ray_local.get(held)
    finally:  # also when a check fails: a task held forever would keep its CPU from the module's later tests
        gate.write_text("open")  # a task still running would now write its shard
    time.sleep(2)
    assert (tmp_path / "fast").exists() and not (tmp_path / "held").exists()


def test_cc3m_tsv_as_released_no_header_and_no_quote_processing(tmp_path):
    """CC3M's TSV: caption<TAB>url, no header line; a caption's lone '"' is just a character
    (quoted parsing made it swallow the lines after it)."""
    tsv = tmp_path / "Train_GCC-training.tsv"
    rows = [('a sign reading "open', "http://h/1.jpg"), ("a dog, running", "http://h/2.jpg"),
            ('12" record on a table', "http://h/3.jpg")]
    tsv.write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    cfg = _cfg(tsv, tmp_path / "pairs", **{"download.column_names": ["caption", "url"]}).download
    table = read_url_list(str(tsv), cfg)
    assert list(zip(table["caption"].to_pylist(), table["url"].to_pylist())) == rows


def test_column_names_must_be_a_list_of_names(tmp_path):
    from lmeye.config import ConfigError

    with pytest.raises(ConfigError, match="column_names"):
        _cfg(tmp_path / "x.tsv", tmp_path / "pairs", **{"download.column_names": []})


def test_parquet_lists_read_only_the_columns_used(tmp_path, monkeypatch):
    """LAION's metadata parquet has many more columns than url and caption."""
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["http://h/1.jpg"], "TEXT": ["a cat"], "similarity": [0.31],
                             "embedding": [[0.5] * 512]}), path)
    read = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: read.append(k.get("columns")) or real(self, *a, **k))
    cfg = _cfg(path, tmp_path / "pairs", **{"download.url_col": "URL", "download.caption_col": "TEXT"}).download
    table = read_url_list(str(path), cfg)
    assert table["caption"].to_pylist() == ["a cat"] and read == [["URL", "TEXT"]]
    with pytest.raises(Exception, match=r"laion.parquet: no caption column 'caption' \(columns: URL, TEXT"):
        read_url_list(str(path), _cfg(path, tmp_path / "p", **{"download.url_col": "URL"}).download)


def test_the_driver_never_reads_or_writes_a_fetched_shard(tmp_path, corpus, server, ray_local, monkeypatch):
    """The tasks that fetch a shard write it (write_shard where the bytes are) and return a
    ShardInfo: in the driver process, reading img2dataset's output or writing a pairs shard
    fails here (the patch reaches this process only, not the Ray workers), and the run still
    completes. Before, the driver's committer thread read, re-encoded and wrote every shard."""
    import pipelines.download as download

    def not_on_the_driver(*args, **kwargs):
        raise AssertionError("table bytes through the driver")

    monkeypatch.setattr(download, "to_pairs", not_on_the_driver)
    monkeypatch.setattr(download, "write_shard", not_on_the_driver)
    urls = write_url_list(corpus, server.base_url, tmp_path / "urls.csv")
    summary = run(_cfg(urls, tmp_path / "pairs"))
    assert summary.ok and summary.shards_done >= 2, summary.render()
    table = TableReader(str(tmp_path / "pairs"), PAIRS).read(columns=["uid", "status", "image"])
    assert table.num_rows == pa.csv.read_csv(urls).num_rows
    assert sum(len(b or b"") for b in table["image"].to_pylist()) > 0


# ----------------------------------------------------------------------------- LAION metadata columns

LAION_EXTRA = ["NSFW", "punsafe", "pwatermark", "similarity", "LICENSE", "WIDTH", "HEIGHT"]


def _laion_parquet(path: Path, urls: list[str]) -> Path:
    """LAION-400M's metadata layout (URL, TEXT and the columns users filter on, plus an embedding
    column nobody asked for), with its types: float32 scores, float64 sizes, text flags."""
    n = len(urls)
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array(range(n), pa.int64()), "URL": urls, "TEXT": [f"caption {i}" for i in range(n)],
        "HEIGHT": pa.array([100.0 + i for i in range(n)], pa.float64()),
        "WIDTH": pa.array([200.0 + i for i in range(n)], pa.float64()),
        "LICENSE": ["?"] * n, "NSFW": ["UNLIKELY"] * (n - 1) + ["NSFW"],
        "similarity": pa.array([0.3 + i / 100 for i in range(n)], pa.float64()),
        "punsafe": pa.array([0.01 * i for i in range(n)], pa.float32()),
        "pwatermark": pa.array([0.5] * n, pa.float32()),
        "embedding": [[0.5] * 8] * n,
    }), path)
    return path


def _laion_cfg(path, out, **more):
    return _cfg(path, out, **{"download.url_col": "URL", "download.caption_col": "TEXT",
                              "download.additional_columns": LAION_EXTRA, **more})


def test_additional_columns_are_read_typed_and_alone(tmp_path, monkeypatch):
    path = _laion_parquet(tmp_path / "part-00000.parquet", [f"http://h/{i}.jpg" for i in range(3)])
    read = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: read.append(k.get("columns")) or real(self, *a, **k))
    table = read_url_list(str(path), _laion_cfg(path, tmp_path / "pairs").download)
    assert sorted(read[0]) == sorted(["URL", "TEXT"] + LAION_EXTRA)  # never SAMPLE_ID or the embedding
    assert table.column_names == ["uid", "url", "caption"] + LAION_EXTRA
    assert table.schema.field("punsafe").type == pa.float64() and table.schema.field("NSFW").type == pa.string()
    assert table["similarity"].to_pylist() == [0.3, 0.31, 0.32]


def test_additional_columns_reach_pairs_of_rows_never_fetched(tmp_path):
    """Rows the stage writes itself (scheme not http): the metadata rides with them, no Ray needed."""
    path = _laion_parquet(tmp_path / "laion.parquet", [f"ftp://example.invalid/{i}.jpg" for i in range(4)])
    out = tmp_path / "pairs"
    summary = run(_laion_cfg(path, out))
    assert summary.ok, summary.render()
    table = TableReader(str(out), PAIRS).read()
    assert table.column_names == PAIRS.columns + LAION_EXTRA
    rows = {r["url"]: r for r in table.to_pylist()}
    assert rows["ftp://example.invalid/3.jpg"]["NSFW"] == "NSFW"
    assert rows["ftp://example.invalid/2.jpg"]["HEIGHT"] == 102.0
    assert rows["ftp://example.invalid/1.jpg"]["punsafe"] == pytest.approx(0.01)


def test_additional_columns_reach_pairs_through_img2dataset(tmp_path, corpus, server, ray_local):
    urls = [f"{server.base_url}/images/{item.name}" for item in corpus.items[:3]]
    urls.append(f"{server.base_url}/missing.jpg")  # a failed row keeps its metadata too
    path = _laion_parquet(tmp_path / "laion.parquet", urls)
    out = tmp_path / "pairs"
    summary = run(_laion_cfg(path, out))
    assert summary.ok, summary.render()
    table = TableReader(str(out), PAIRS).read()
    assert table.column_names == PAIRS.columns + LAION_EXTRA
    rows = {r["url"]: r for r in table.to_pylist()}
    assert [rows[u]["similarity"] for u in urls] == pytest.approx([0.3, 0.31, 0.32, 0.33])
    assert [rows[u]["WIDTH"] for u in urls] == [200.0, 201.0, 202.0, 203.0]
    assert rows[urls[0]]["status"] == SUCCESS and rows[urls[3]]["status"] != SUCCESS
    assert rows[urls[3]]["NSFW"] == "NSFW" and rows[urls[3]]["LICENSE"] == "?"


def test_additional_columns_missing_or_mistyped_are_one_error_naming_file_and_column(tmp_path):
    from pipelines.download import InputError, plan_inputs

    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"url": "http://h/1.jpg", "caption": "x", "similarity": 0.3}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"url": "http://h/2.jpg", "caption": "y", "similarity": "n/a"}) + "\n")
    cfg = _cfg(folder, tmp_path / "pairs", **{"download.additional_columns": ["similarity"]}).download
    with pytest.raises(InputError, match=r"b.jsonl: additional column 'similarity' holds string values where earlier rows held double"):
        plan_inputs(str(folder), str(tmp_path / "staging"), cfg)
    cfg = _cfg(folder, tmp_path / "pairs", **{"download.additional_columns": ["pwatermark"]}).download
    with pytest.raises(InputError, match=r"a.jsonl: no additional column 'pwatermark' .*download.additional_columns"):
        plan_inputs(str(folder), str(tmp_path / "staging"), cfg)


@pytest.mark.parametrize("columns,match", [
    (["status"], "'status' is a column the pairs table or img2dataset already writes"),
    (["key"], "'key' is a column"),
    (["url"], "'url' is a column"),
    (["NSFW", "NSFW"], "'NSFW' is listed twice"),
])
def test_additional_columns_may_not_shadow_pairs_or_img2dataset_columns(tmp_path, columns, match):
    from lmeye.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path / "x.parquet", tmp_path / "pairs", **{"download.additional_columns": columns})


def test_coco_annotation_file_as_released_is_a_url_list(tmp_path):
    """captions_train2017.json itself: its ``images`` list holds the URLs (no derived list)."""
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps({
        "info": {"year": 2017}, "licenses": [{"id": 1, "name": "x"}],
        "images": [{"license": 1, "file_name": f"{i:012d}.jpg", "id": i,
                    "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg"} for i in (9, 25)],
        "annotations": [{"image_id": 9, "id": 1, "caption": "a plate of food"}],
    }))
    cfg = _cfg(path, tmp_path / "pairs", **{"download.url_col": "coco_url", "download.caption_col": None}).download
    table = read_url_list(str(path), cfg)
    assert table["url"].to_pylist() == [f"http://images.cocodataset.org/train2017/{i:012d}.jpg" for i in (9, 25)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(Exception, match=r"bad.json: cannot read as json \(expected a JSON list of rows, or COCO's object"):
        read_url_list(str(bad), cfg)
