"""The learning check's question set (lmeye.demo.learning_check)."""

from __future__ import annotations

import pyarrow as pa

from lmeye.demo.learning_check import _rows
from lmeye.tables import TableWriter
from pipelines.instruct.formats import Formatter, AnswerPool
from schemas.instructions import INSTRUCTIONS


def test_the_check_asks_the_plain_questions_not_the_forms_the_instruct_stage_gave_them(tmp_path):
    """With formats {plain: 2, yes_no: 1} a question whose type has no other answer to contrast (and is no
    count, which contrasts with the counts next to it) becomes the short-answer form, not yes/no; kept in the
    check, every such question would stay while a third of the others went to yes/no, and the most common
    answer's score would rise (0.309 -> 0.352 on seed 0, when a one-shape corpus's counts went that way)."""
    questions = [("How many shapes are in the image?", "1"), ("What colour is the circle?", "red"),
                 ("What colour is the star?", "blue"), ("What shape is at the top left?", "star"),
                 ("Where is the red circle?", "top left")] * 30
    pool = AnswerPool(questions, words=3)
    fmt = Formatter({"plain": 2, "yes_no": 1}, pool, 0, "demo_vqa")
    rows = []
    for i, (q, a) in enumerate(questions):
        task, ((_, user), (_, reply)) = fmt.apply(q, a, "vqa", str(i), ("user", "assistant"))
        rows.append({"sample_id": f"s{i}", "uid": f"u{i}", "source": "demo_vqa", "task": task, "split": "validation",
                     "conversation": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    schema = INSTRUCTIONS.schema
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    writer = TableWriter(str(tmp_path / "instructions"), INSTRUCTIONS, config={"test": 1})
    writer.write("validation-00000.parquet", table)
    writer.finalize(["validation-00000.parquet"], stats={})

    got = _rows(str(tmp_path / "instructions"), "validation", "vqa")
    plain = [r for r in rows if r["task"] == "vqa" and "\n" not in r["conversation"][0]["content"]]
    short = [r for r in rows if r["task"] == "vqa" and "\n" in r["conversation"][0]["content"]]
    assert short and len(plain) < len(rows) - len(short)  # some of each form was drawn
    assert [(r["uid"], r["question"], r["answer"]) for r in got] == [
        (r["uid"], r["conversation"][0]["content"], r["conversation"][1]["content"]) for r in plain]
    counts = sum(r["question"].startswith("How many") for r in got)
    assert 0 < counts < 30  # the count questions are thinned like the others (asked yes/no: "Is the answer 2?")
    assert any(r["task"] == "vqa_yes_no" and r["conversation"][0]["content"].startswith("How many") for r in rows)
