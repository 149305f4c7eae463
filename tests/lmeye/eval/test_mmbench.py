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


def _opts(*texts):
    return tuple(zip("ABCDEFGH", texts))

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

    name = "passes"

    def __init__(self, script: dict[str, list[str]]):
        self.script = {q: list(r) for q, r in script.items()}
        self.prompts: list[str] = []

    def answer(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            assert image is not None and image.size == (8, 8)
            self.prompts.append(prompt)
            question = next(q for q in self.script if q in prompt)
            out.append(self.script[question].pop(0))
        return out

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
    assert extract_choice(response, _opts(*options)) == letter


def test_rotations_shift_options_and_remap_the_answer():
    # pass 1: new A = old B (VLMEvalKit CIRCULAR), so the answer "x" (old A) moves to C, then B.
    assert rotations(("x", "y", "z"), "A") == [(("x", "y", "z"), "A"), (("y", "z", "x"), "C"), (("z", "x", "y"), "B")]
    assert rotations(("p", "q"), "B") == [(("p", "q"), "B"), (("q", "p"), "A")]


def test_prompt_is_llava_style_and_skips_empty_hints():
    assert build_prompt("Q?", "nan", _opts("a", "b")) == f"Q?\nA. a\nB. b\n{PROMPT_SUFFIX}"
    assert build_prompt("Q?", "Look.", _opts("a", "b")) == f"Look.\nQ?\nA. a\nB. b\n{PROMPT_SUFFIX}"


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
    _write_tsv(path, [_row(1, "Q", ("a", "b"), "A", "c", "l2"), _row(2, "Q", ("a", "b"), "", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:3: column 'answer' is missing here but not in other rows"):
        read_mmbench(path)
    _write_tsv(path, [_row(1, "Q", ("a",), "A", "c", "l2")])
    with pytest.raises(LayoutError, match=r"bad\.tsv:2: one option \(column A\)"):
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



# ---------------------------------------------------------------------------------------------
# The official rules, on TSVs in the released layouts


class EchoAnswerer:
    """Answers every prompt with the letter of the option holding ``right`` (a wrong letter if none)."""

    name = "echo"

    def __init__(self, right: dict[str, str]):
        self.right = right
        self.prompts: list[str] = []
        self.calls: list[int] = []

    def answer(self, images, prompts):
        self.calls.append(len(prompts))
        self.prompts += prompts
        out = []
        for prompt in prompts:
            lines = prompt.split("\n")
            truth = next(v for k, v in self.right.items() if k in prompt)
            out.append(next((ln[0] for ln in lines if ln[1:3] == ". " and ln[3:] == truth), "I don't know"))
        return out


def test_abnormal_rows_are_asked_once_not_rotated(tmp_path):
    rows = [
        _row(1, "Which two?", ("red", "green", "Both A and B", "neither"), "C", "c", "l2"),  # names A and B as words
        _row(2, "Which letter?", ("A", "x", "y", "z"), "A", "c", "l2"),  # an option that is a bare letter
        _row(3, "Anything?", ("", "", "", ""), "A", "c", "l2"),  # no options: asked once, never right
        _row(4, "Which colour?", ("red", "green", "blue", "A lot"), "A", "c", "l2"),  # one letter only: normal
    ]
    tsv = _write_tsv(tmp_path / "mmbench_dev_en.tsv", rows)
    answerer = EchoAnswerer({"Which two?": "Both A and B", "Which letter?": "A", "Which colour?": "red", "Anything?": "-"})
    result = evaluate_mmbench(answerer, tsv, tmp_path / "out")
    assert sum("Which two?" in p for p in answerer.prompts) == 1
    assert sum("Which letter?" in p for p in answerer.prompts) == 1
    assert answerer.prompts.count(f"Anything?\n{PROMPT_SUFFIX}") == 1
    assert sum("Which colour?" in p for p in answerer.prompts) == 4
    assert (result["questions"], result["passes"], result["asked_once"]) == (4, 7, 3)
    assert result["overall"] == 0.75  # all but the question without options


def test_a_tsv_with_the_circular_copies_is_not_rotated_again(tmp_path):
    # VLMEvalKit's _circular.tsv: pass i of question g has index g + i * 1e6, its image the index g,
    # the options rotated and the answer remapped.
    rows = [
        _row(7, "Which colour?", ("red", "green", "blue"), "A", "color", "attr"),
        _row(8, "Which shape?", ("circle", "square"), "B", "shape", "perc"),
        _row(1000007, "Which colour?", ("green", "blue", "red"), "C", "color", "attr", image="7"),
        _row(1000008, "Which shape?", ("square", "circle"), "A", "shape", "perc", image="8"),
        _row(2000007, "Which colour?", ("blue", "red", "green"), "B", "color", "attr", image="7"),
    ]
    tsv = _write_tsv(tmp_path / "MMBench_DEV_EN_circular.tsv", rows)
    answerer = EchoAnswerer({"Which colour?": "red", "Which shape?": "circle"})
    result = evaluate_mmbench(answerer, tsv, tmp_path / "out")
    assert len(answerer.prompts) == 5  # the rows, each once
    assert (result["questions"], result["passes"], result["overall"]) == (2, 5, 0.5)  # shape: square is right
    assert result["category"] == {"color": 1.0, "shape": 0.0}
    saved = [json.loads(line) for line in (tmp_path / "out" / "mmbench_answers.jsonl").read_text().splitlines()]
    assert [(s["index"], s["g_index"], s["rotation"]) for s in saved] == [(7, 7, 0), (8, 8, 0), (1000007, 7, 1), (1000008, 8, 1), (2000007, 7, 2)]


def test_every_non_missing_option_is_kept_and_missing_means_pandas_nan(tmp_path):
    rows = [
        # C is blank but D is not: D is kept (under its letter), and the row is asked once
        _row(1, "Q gap?", ("a", "b", "", "d"), "D", "c", "l2"),
        # "none" is option text; "NA", "N/A", "null" are missing, as pandas reads them
        _row(2, "Q none?", ("none", "some", "NA", "N/A"), "A", "c", "l2", hint="None"),
        _row(3, "Q null?", ("x", "y", "null", ""), "B", "c", "l2", hint="none"),
    ]
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv", rows)
    questions = read_mmbench(tsv)
    assert [q.options for q in questions] == [(("A", "a"), ("B", "b"), ("D", "d")), _opts("none", "some"), _opts("x", "y")]
    assert [q.hint for q in questions] == [None, None, "none"]
    answerer = EchoAnswerer({"Q gap?": "d", "Q none?": "none", "Q null?": "y"})
    result = evaluate_mmbench(answerer, tsv, tmp_path / "out")
    assert answerer.prompts[0] == f"Q gap?\nA. a\nB. b\nD. d\n{PROMPT_SUFFIX}"
    assert answerer.prompts[1] == f"Q none?\nA. none\nB. some\n{PROMPT_SUFFIX}"  # hint "None" is NaN
    assert answerer.prompts[3].startswith("none\nQ null?\nA. x\nB. y\n")  # hint "none" is text
    assert (result["passes"], result["overall"]) == (5, 1.0)


def test_each_pass_records_the_prompt_sent(tmp_path):
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv", [_row(1, "Which?", ("p", "q"), "B", "c", "l2", hint="Hint.")])
    answerer = EchoAnswerer({"Which?": "q"})
    evaluate_mmbench(answerer, tsv, tmp_path / "out")
    saved = [json.loads(line) for line in (tmp_path / "out" / "mmbench_answers.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in saved] == answerer.prompts
    assert saved[1]["prompt"] == f"Hint.\nWhich?\nA. q\nB. p\n{PROMPT_SUFFIX}"
    assert (saved[1]["answer"], saved[1]["response"], saved[1]["extracted"]) == ("A", "A", "A")


def test_the_test_split_writes_the_submission_file(tmp_path):
    from openpyxl import load_workbook

    columns = ["index", "question", "hint", "A", "B", "C", "D", "category", "source", "l2-category", "comment", "split", "image"]
    rows = [_row(10, "Which colour?", ("red", "green", "blue", "nan"), "", "color", "attr"),
            _row(11, "Which shape?", ("circle", "square", "nan", "nan"), "", "shape", "perc", image="10")]
    for row in rows:
        row.update(source="src", comment="nan", split="test")
    tsv = _write_tsv(tmp_path / "mmbench_test_en.tsv", rows, columns=columns)
    answerer = EchoAnswerer({"Which colour?": "green", "Which shape?": "circle"})
    result = evaluate_mmbench(answerer, tsv, tmp_path / "out")
    assert len(answerer.prompts) == 2  # each row once; the server does CircularEval
    assert result["split"] == "test" and "overall" not in result
    sheet = load_workbook(tmp_path / "out" / "mmbench_submission.xlsx").active
    values = [list(r) for r in sheet.iter_rows(values_only=True)]
    # LLaVA convert_mmbench_for_submission.py: drop hint/category/source/image/comment/l2-category, prediction 7th
    assert values[0] == ["index", "question", "A", "B", "C", "D", "prediction", "split"]
    assert values[1] == [10, "Which colour?", "red", "green", "blue", None, "B", "test"]
    assert values[2] == [11, "Which shape?", "circle", "square", None, None, "A", "test"]


class Stops(Exception):
    pass


def test_an_interrupted_run_resumes_without_asking_twice(tmp_path):
    rows = [_row(i, f"Q{i}?", ("p", "q", "r"), "A", "c", "l2") for i in range(1, 4)]
    tsv = _write_tsv(tmp_path / "mmbench_dev.tsv", rows)
    right = {f"Q{i}?": "p" for i in range(1, 4)}

    class Dies(EchoAnswerer):
        def answer(self, images, prompts):
            if len(self.calls) == 2:
                raise Stops
            return super().answer(images, prompts)

    with pytest.raises(Stops):
        evaluate_mmbench(Dies(right), tsv, tmp_path / "out", batch_size=4)
    again = EchoAnswerer(right)
    result = evaluate_mmbench(again, tsv, tmp_path / "out", batch_size=4)
    assert again.calls == [1]  # 9 passes: 8 were written before the interruption
    assert (result["passes"], result["overall"]) == (9, 1.0)
    assert len((tmp_path / "out" / "mmbench_answers.jsonl").read_text().splitlines()) == 9
