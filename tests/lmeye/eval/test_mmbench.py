"""MMBench: the TSV layout, CircularEval, rule-based choice extraction and unparsed answers."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lmeye.eval.common import LayoutError
from lmeye.eval.mmbench import (
    PROMPT_SUFFIX,
    build_prompt,
    evaluate_mmbench,
    extract_choice,
    read_mmbench,
    rotations,
)

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def _b64_image(colour=(10, 200, 10)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _write_tsv(path: Path, rows: list[dict], columns=COLUMNS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t", lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def _row(index, question, options, answer, category, l2, hint="nan", image=None):
    row = dict(index=index, question=question, hint=hint, answer=answer, category=category, split="dev",
               image=image if image is not None else _b64_image())
    row["l2-category"] = l2
    row.update(zip("ABCD", options))
    return row


class PassAnswerer:
    """Replies to each question with its scripted responses, one per pass, in order."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = {q: list(r) for q, r in script.items()}
        self.prompts: list[str] = []

    def answer(self, image, prompt):
        assert image is not None and image.size == (8, 8)
        self.prompts.append(prompt)
        question = next(q for q in self.script if q in prompt)
        return self.script[question].pop(0)

    def choice_loglik(self, image, question, choices):
        raise AssertionError("MMBench is scored from generated answers")


@pytest.mark.parametrize(
    "response, options, letter",
    [
        ("A", ("red", "green"), "A"),
        ("The answer is B.", ("red", "green", "blue"), "B"),
        ("(C) blue", ("red", "green", "blue"), "C"),
        ("green", ("red", "green", "blue"), "B"),  # by option text
        ("red or green", ("red", "green", "blue"), None),  # two option texts: unparsed
        ("A or B", ("red", "green", "blue"), None),  # two letters: unparsed
        ("B is right, not that one over there at all", ("x1", "y1"), None),  # letter not among the last 4 tokens
        ("Cannot determine the answer", ("red", "green"), "Z"),
        ("hello", ("red", "green"), None),
        ("2", ("1", "2", "3", "4"), "B"),
    ],
)
def test_extract_choice_is_vlmevalkit_rule(response, options, letter):
    assert extract_choice(response, options) == letter


def test_rotations_shift_options_and_remap_the_answer():
    # pass 1: new A = old B (VLMEvalKit CIRCULAR), so the answer "x" (old A) moves to C, then B.
    assert rotations(("x", "y", "z"), "A") == [(("x", "y", "z"), "A"), (("y", "z", "x"), "C"), (("z", "x", "y"), "B")]
    assert rotations(("p", "q"), "B") == [(("p", "q"), "B"), (("q", "p"), "A")]


def test_prompt_is_llava_style_and_skips_empty_hints():
    assert build_prompt("Q?", "nan", ("a", "b")) == f"Q?\nA. a\nB. b\n{PROMPT_SUFFIX}"
    assert build_prompt("Q?", "Look.", ("a", "b")) == f"Look.\nQ?\nA. a\nB. b\n{PROMPT_SUFFIX}"


def test_circular_eval_worked_out_by_hand(tmp_path):
    rows = [
        # 4 options, right in every rotation (by letter, by "answer is", by text): counts.
        _row(1, "Which colour?", ("red", "green", "blue", "yellow"), "A", "color", "attribute"),
        # 3 options, right in passes 0 and 1 but wrong in pass 2: does not count.
        _row(2, "How many?", ("1", "2", "3"), "B", "count", "attribute"),
        # 2 options, right in pass 0, unparsed in pass 1: does not count; one unparsed answer.
        _row(3, "Which shape?", ("circle", "square"), "B", "shape", "perception", hint="Look closely."),
        # 2 options, right twice; its image is row 1's, referred to by index (VLMEvalKit's TSVs do this).
        _row(4, "Which animal?", ("cat", "dog"), "A", "animal", "perception", image="1"),
        # A legacy pre-rotated copy (index >= 1e6): skipped.
        _row(1000001, "Which colour?", ("green", "blue", "yellow", "red"), "D", "color", "attribute"),
    ]
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv", rows)
    answerer = PassAnswerer({
        # pass 1 options (green, blue, yellow, red): red is D; pass 2 (blue, yellow, red, green): C;
        # pass 3 (yellow, red, green, blue): B, given as the option text.
        "Which colour?": ["A", "D", "The answer is C", "red"],
        "How many?": ["B", "A", "A"],  # pass 2 options (3, 1, 2): "2" is C, so "A" is wrong
        "Which shape?": ["B", "I don't know"],
        "Which animal?": ["A", "B"],  # pass 1 options (dog, cat)
    })
    result = evaluate_mmbench(answerer, tsv, tmp_path / "out")

    assert (result["questions"], result["passes"]) == (4, 4 + 3 + 2 + 2)
    assert result["overall"] == pytest.approx(2 / 4)  # questions 1 and 4
    assert result["single_pass"] == pytest.approx(1.0)  # every first pass was right
    assert result["l2_category"] == {"attribute": 0.5, "perception": 0.5}
    assert result["category"] == {"animal": 1.0, "color": 1.0, "count": 0.0, "shape": 0.0}
    assert (result["unparsed"], result["unparsed_questions"], result["refused"]) == (1, 1, 0)
    assert all(not v for v in answerer.script.values())  # every scripted pass was asked
    assert answerer.prompts[7].startswith("Look closely.\nWhich shape?\nA. circle\nB. square\n")

    md = (tmp_path / "out" / "mmbench.md").read_text()
    assert "**Overall: 50.00%**" in md and "| count | 0.00 |" in md and "Unparsed answers (counted wrong): 1 of 11" in md
    saved = [json.loads(line) for line in (tmp_path / "out" / "mmbench_answers.jsonl").read_text().splitlines()]
    assert [s["extracted"] for s in saved if s["index"] == 3] == ["B", None]
    assert json.loads((tmp_path / "out" / "mmbench.json").read_text())["overall"] == 0.5


def test_mmbench_layout_errors_name_the_path_and_row(tmp_path):
    path = tmp_path / "bad.tsv"
    with pytest.raises(LayoutError, match=r"bad\.tsv: not a file"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "A", "c", "l2")], columns=[c for c in COLUMNS if c != "l2-category"])
    with pytest.raises(LayoutError, match=r"bad\.tsv:1: missing column\(s\) l2-category"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "A", "c", "l2"), _row(2, "Q", ("a", "b"), "C", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:3: column 'answer' is 'C'; expected one of A, B"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: column 'answer' is ''.*answers are hidden"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a",), "A", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: fewer than 2 options"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "A", "c", "l2", image="7")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: column 'image' refers to row index 7"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "A", "c", "l2", image="@@not base64@@")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: column 'image' is neither base64"):
        read_mmbench(path)
    _write_tsv(path, [_row("x", "Q", ("a", "b"), "A", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: column 'index' is 'x'"):
        read_mmbench(path)
