"""The shared entry points (`lmeye <stage>` and `jobs/<stage>.py`): exit codes, Ctrl-C, --overwrite."""

from __future__ import annotations

import pyarrow as pa
import pytest

from lmeye.config import load_config
from lmeye.entry import EXIT_INTERRUPTED, job_main, run_stage
from lmeye.report import StageSummary
from lmeye.tables import TableWriter
from schemas.pairs import PAIRS


def _interrupted(cfg):
    raise KeyboardInterrupt


@pytest.mark.parametrize("call", [
    lambda: run_stage(_interrupted, load_config(None, {})),
    lambda: job_main(_interrupted, []),
])
def test_ctrl_c_prints_one_line_and_exits_130(call, capsys):
    assert call() == EXIT_INTERRUPTED == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "interrupted; rerun the same command to resume"
    assert "Traceback" not in captured.out + captured.err


def _stage_writing(path: str, uids: list[str], inputs: str):
    def stage(cfg) -> StageSummary:
        w = TableWriter(path, PAIRS, config={"k": 1}, input_fingerprint=inputs)
        w.write("00000.parquet", pa.table({"uid": uids, "url": uids}), input_fingerprint=inputs)
        w.finalize(["00000.parquet"], stats={})
        return StageSummary(stage="toy", output=path, rows=len(uids))
    return stage


def test_overwrite_flag_reaches_every_writer_and_the_summary_counts_replaced_rows(tmp_path, capsys):
    out = str(tmp_path / "t")
    assert job_main(_stage_writing(out, ["a", "b", "c"], "in1"), []) == 0
    capsys.readouterr()
    assert job_main(_stage_writing(out, ["d"], "in2"), []) == 2  # other inputs: refused, one line
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: holds a pairs table built from other inputs") and err.count("\n") == 1
    assert job_main(_stage_writing(out, ["d"], "in2"), ["--overwrite"]) == 0
    assert "note: --overwrite: replaced 3 row(s)" in capsys.readouterr().out


def test_every_stage_command_takes_overwrite():
    from lmeye.cli import build_parser

    parser = build_parser()
    for argv in (["download", "in.csv", "out"], ["extract", "p", "f"], ["instruct"]):
        assert parser.parse_args([*argv, "--overwrite"]).overwrite is True


@pytest.mark.parametrize("argv", [
    lambda shard, tmp: ["extract", str(shard), str(tmp / "features")],
    lambda shard, tmp: ["store", "info", str(shard)],
    lambda shard, tmp: ["instruct", "--set", f"data.root={tmp}", "--set", f"instruct.pairs={shard}",
                        "--set", "instruct.require_features=false"],
])
def test_a_shard_file_given_as_a_table_is_one_line(argv, make_pairs, tmp_path, capsys):
    from lmeye.cli import main

    path, _ = make_pairs(num_images=2, shards=1)
    shard = next(path.glob("*.parquet"))
    args = argv(shard, tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{shard}: is a file, not a table folder" in err and f"did you mean {path}?" in err
