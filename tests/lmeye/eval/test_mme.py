"""MME: the official yes/no parse, acc / acc+ per subtask, totals, and the release layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lmeye.eval.common import LayoutError
from lmeye.eval.mme import MMEAnswer, evaluate_mme, parse_yes_no, read_mme, score_mme

YN = " Please answer yes or no."


class ScriptedAnswerer:
    """Answers by question text; remembers what it was asked, and the size of each call."""

    name = "scripted"

    def __init__(self, responses: dict[str, str]):
        self.responses = responses
        self.asked: list[tuple[tuple[int, int], str]] = []
        self.calls: list[int] = []

    def answer(self, images, questions):
        self.calls.append(len(questions))
        self.asked += [(image.size, q) for image, q in zip(images, questions)]
        return [self.responses[q] for q in questions]

    def choice_loglik(self, image, question, choices):
        raise AssertionError("MME does not rank choices")


def _image(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (200, 10, 10)).save(path)


def _qa(path: Path, lines: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{q}\t{a}\n" for q, a in lines))


@pytest.mark.parametrize(
    "response, label",
    [
        ("yes", "yes"), ("No", "no"), ("Yes, there is.", "yes"), ("Not really", "no"), ("none", "no"),
        ("nope", "no"), ("Maybe", "other"), ("I think yes", "other"), ("The answer is no", "other"), ("", "other"),
    ],
)
def test_parse_yes_no_is_the_official_rule(response, label):
    assert parse_yes_no(response) == label


def _fixture(root: Path) -> dict[str, str]:
    """Two perception subtasks (flat and images/ layouts) and one cognition subtask; the responses."""
    _image(root / "existence" / "a.jpg")
    _qa(root / "existence" / "a.txt", [("Is there a cat?" + YN, "Yes"), ("Is there a dog?" + YN, "No")])
    _image(root / "existence" / "b.png")
    _qa(root / "existence" / "b.txt", [("Is there a bus?" + YN, "Yes"), ("Is there a car?" + YN, "No")])
    _image(root / "artwork" / "images" / "c.jpg", size=10)
    _qa(root / "artwork" / "questions_answers_YN" / "c.txt", [("Is it by Monet?" + YN, "Yes"), ("Is it by Turner?" + YN, "No")])
    _image(root / "code_reasoning" / "d.png")
    _qa(root / "code_reasoning" / "d.txt", [("Does it print 2?" + YN, "No"), ("Does it print 3?" + YN, "Yes")])
    (root / "not_a_subtask").mkdir()  # ignored
    return {
        "Is there a cat?" + YN: "Yes",  # a: both right
        "Is there a dog?" + YN: "No",
        "Is there a bus?" + YN: "yes, it is",  # b: first right ...
        "Is there a car?" + YN: "Yes",  # ... second wrong
        "Is it by Monet?" + YN: "Maybe",  # c: other (wrong)
        "Is it by Turner?" + YN: "no",
        "Does it print 2?" + YN: "Not at all",  # d: both right
        "Does it print 3?" + YN: "yes",
    }


def test_mme_scores_worked_out_by_hand(tmp_path):
    responses = _fixture(tmp_path / "MME")
    result = evaluate_mme(ScriptedAnswerer(responses), tmp_path / "MME", tmp_path / "out")

    existence = result["subtasks"]["existence"]
    # 3 of 4 questions right; image a has both right, image b one of two: acc 0.75, acc+ 0.5.
    assert (existence["questions"], existence["images"], existence["correct"]) == (4, 2, 3)
    assert existence["acc"] == pytest.approx(0.75) and existence["acc_plus"] == pytest.approx(0.5)
    assert existence["score"] == pytest.approx(125.0)
    artwork = result["subtasks"]["artwork"]
    assert (artwork["acc"], artwork["acc_plus"], artwork["score"], artwork["other"]) == (0.5, 0.0, 50.0, 1)
    code = result["subtasks"]["code_reasoning"]
    assert (code["group"], code["score"]) == ("cognition", 200.0)
    assert result["perception"] == pytest.approx(175.0)
    assert result["cognition"] == pytest.approx(200.0)
    assert result["other"] == 1

    md = (tmp_path / "out" / "mme.md").read_text()
    assert "| existence | perception | 2 | 4 | 75.00 | 50.00 | 125.00 | 0 |" in md
    assert "Perception: 175.00" in md and "Cognition: 200.00" in md
    official = (tmp_path / "out" / "mme_results" / "existence.txt").read_text().splitlines()
    assert official[3] == "b.png\tIs there a car?" + YN + "\tNo\tYes"


def test_mme_score_is_pure_over_answers():
    answers = [
        MMEAnswer("count", "x.jpg", "q1", "Yes", "yes"),
        MMEAnswer("count", "x.jpg", "q2", "No", "yes"),
        MMEAnswer("count", "y.jpg", "q3", "Yes", "no"),
        MMEAnswer("count", "y.jpg", "q4", "No", "yes"),
    ]
    count = score_mme(answers)["subtasks"]["count"]
    assert (count["acc"], count["acc_plus"], count["score"]) == (0.25, 0.0, 25.0)


def test_multiline_response_is_scored_as_one_line(tmp_path):
    responses = _fixture(tmp_path / "MME")
    responses["Is there a car?" + YN] = "No\nbecause"
    result = evaluate_mme(ScriptedAnswerer(responses), tmp_path / "MME", tmp_path / "out")
    assert result["subtasks"]["existence"]["acc_plus"] == 1.0


def test_mme_layout_errors_name_the_path_and_row(tmp_path):
    root = tmp_path / "MME"
    with pytest.raises(LayoutError, match="not a folder"):
        read_mme(root)
    root.mkdir()
    with pytest.raises(LayoutError, match="no MME subtask folders"):
        read_mme(root)

    _image(root / "count" / "a.jpg")
    with pytest.raises(LayoutError, match=r"count/a\.txt: missing"):
        read_mme(root)
    (root / "count" / "a.txt").write_text("How many?\tYes\nHow many cats? Yes\n")
    with pytest.raises(LayoutError, match=r"count/a\.txt:2: expected 'question<TAB>Yes\|No'"):
        read_mme(root)
    (root / "count" / "a.txt").write_text("q1\tYes\nq2\tNo\nq3\tYes\n")
    with pytest.raises(LayoutError, match=r"count/a\.txt: 3 questions; MME has exactly 2"):
        read_mme(root)
    (root / "count" / "a.txt").write_text("q1\tyes\n\nq2\tNO\n")  # blank lines and case are fine
    assert [q.truth for q in read_mme(root)] == ["Yes", "No"]


def test_unreadable_image_names_its_path(tmp_path):
    root = tmp_path / "MME"
    (root / "color").mkdir(parents=True)
    (root / "color" / "a.jpg").write_bytes(b"not an image")
    _qa(root / "color" / "a.txt", [("q1", "Yes"), ("q2", "No")])
    with pytest.raises(LayoutError, match=r"color/a\.jpg: cannot open the image"):
        evaluate_mme(ScriptedAnswerer({}), root, tmp_path / "out")


def test_results_files_for_all_14_subtasks_and_no_tab_in_a_response(tmp_path):
    from lmeye.eval.mme import SUBTASKS

    responses = _fixture(tmp_path / "MME")
    responses["Is there a car?" + YN] = "No\tI see\r\nno car"
    answerer = ScriptedAnswerer(responses)
    evaluate_mme(answerer, tmp_path / "MME", tmp_path / "out", batch_size=3)
    assert answerer.calls == [3, 3, 2]  # 8 questions, in batches of 3
    folder = tmp_path / "out" / "mme_results"
    assert sorted(p.stem for p in folder.iterdir()) == sorted(SUBTASKS)  # calculation.py opens all 14
    assert (folder / "OCR.txt").read_text() == ""
    for path in folder.iterdir():
        for line in path.read_text().splitlines():
            assert len(line.split("\t")) == 4, (path, line)  # Image_Name, Question, Ground_Truth, Response
    existence = (folder / "existence.txt").read_text().splitlines()
    assert existence[3] == "b.png\tIs there a car?" + YN + "\tNo\tNo I see  no car"


class Interrupted(Exception):
    pass


class DiesAfter(ScriptedAnswerer):
    def __init__(self, responses, calls):
        super().__init__(responses)
        self.left = calls

    def answer(self, images, questions):
        if self.left == 0:
            raise Interrupted
        self.left -= 1
        return super().answer(images, questions)


def test_an_interrupted_run_resumes_from_the_answers_written(tmp_path):
    responses = _fixture(tmp_path / "MME")
    with pytest.raises(Interrupted):
        evaluate_mme(DiesAfter(responses, calls=2), tmp_path / "MME", tmp_path / "out", batch_size=3)
    assert len((tmp_path / "out" / "mme_answers.jsonl").read_text().splitlines()) == 6
    again = ScriptedAnswerer(responses)
    resumed = evaluate_mme(again, tmp_path / "MME", tmp_path / "out", batch_size=3)
    assert again.calls == [2]  # only the last 2 questions are asked
    fresh = evaluate_mme(ScriptedAnswerer(responses), tmp_path / "MME", tmp_path / "fresh", batch_size=3)
    assert resumed["subtasks"] == fresh["subtasks"]
    assert len((tmp_path / "out" / "mme_answers.jsonl").read_text().splitlines()) == 8  # no duplicates

    other = ScriptedAnswerer(responses)
    other.name = "another checkpoint"
    evaluate_mme(other, tmp_path / "MME", tmp_path / "out", batch_size=3)
    assert other.calls == [3, 3, 2]  # another model's answers are never reused
