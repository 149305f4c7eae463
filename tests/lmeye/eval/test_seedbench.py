"""SEED-Bench (image): the JSON layout, likelihood ranking, accuracy per dimension and overall."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lmeye.eval.common import LayoutError
from lmeye.eval.seedbench import evaluate_seedbench, predict, read_seedbench


class LoglikAnswerer:
    name = "loglik"

    def __init__(self, scores: dict[str, list[float]]):
        self.scores = scores
        self.calls: list[tuple[str, list[str]]] = []

    def answer(self, images, questions):
        raise AssertionError("SEED-Bench ranks choices by likelihood; it never generates")

    def choice_loglik(self, images, questions, choices):
        assert all(image is not None for image in images)
        self.calls += list(zip(questions, choices))
        return [self.scores[q] for q in questions]


def _item(qid, question, answer, type_id, data_id="a.jpg", data_type="image", choices=("w", "x", "y", "z")):
    item = {"question_id": qid, "question": question, "answer": answer, "question_type_id": type_id,
            "data_id": data_id, "data_type": data_type}
    item.update({f"choice_{k}": c for k, c in zip("abcd", choices)})
    return item


def _write(root: Path, questions: list, images=("a.jpg",)) -> Path:
    (root / "SEED-Bench-image").mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (6, 6), (0, 0, 255)).save(root / "SEED-Bench-image" / name)
    doc = {"questions": questions, "question_type": {"Scene Understanding": 1, "Instances Counting": 5}}
    (root / "SEED-Bench.json").write_text(json.dumps(doc))
    return root


def test_ties_go_to_the_earlier_letter():
    assert predict([-1.0, -2.0, -0.5, -3.0]) == "C"
    assert predict([-1.0, -5.0, -1.0, -9.0]) == "A"


def test_seedbench_scores_worked_out_by_hand(tmp_path):
    root = _write(tmp_path / "seed", [
        _item("1", "What is the scene?", "A", 1, choices=("a park", "a room", "a street", "a beach")),
        _item("2", "What is the weather?", "C", 1),
        _item("3", "How many cars?", "D", 5),
        _item("4", "What happens next?", "A", 10, data_type="video"),  # video: left out
        _item("5", "Which frame?", "A", 11),  # a video dimension id: left out
    ])
    answerer = LoglikAnswerer({
        "What is the scene?": [-1.0, -2.0, -3.0, -4.0],  # A: right
        "What is the weather?": [-1.0, -5.0, -1.0, -9.0],  # tie A/C -> A: wrong
        "How many cars?": [-9.0, -9.0, -9.0, -0.5],  # D: right
    })
    result = evaluate_seedbench(answerer, root, tmp_path / "out")  # the folder: finds SEED-Bench.json

    assert answerer.calls[0] == ("What is the scene?", ["a park", "a room", "a street", "a beach"])
    assert (result["questions"], result["correct"]) == (3, 2)
    assert result["overall"] == pytest.approx(2 / 3)
    assert result["dimensions"]["Scene Understanding"] == {"id": 1, "questions": 2, "correct": 1, "accuracy": 0.5}
    assert result["dimensions"]["Instances Counting"]["accuracy"] == 1.0
    assert result["video_left_out"] == 2
    assert "Video items left out (image task only): 2." in (tmp_path / "out" / "seedbench.md").read_text()
    # per question, SEED-Bench eval.py's record (the leaderboard's form)
    records = [json.loads(line) for line in (tmp_path / "out" / "seedbench_results.jsonl").read_text().splitlines()]
    assert records[1] == {"question_id": "2", "prediction": "A", "gt": "C", "question_type_id": 1, "q_type_id": 1}
    assert [r["prediction"] for r in records] == ["A", "A", "D"]
    md = (tmp_path / "out" / "seedbench.md").read_text()
    assert "| 1 | Scene Understanding | 2 | 1 | 50.00 |" in md and "**Overall: 66.67%** (2 of 3)" in md


def test_seedbench_layout_errors_name_the_path_and_row(tmp_path):
    with pytest.raises(LayoutError, match=r"SEED-Bench\.json: not found"):
        read_seedbench(tmp_path)
    path = tmp_path / "SEED-Bench.json"
    path.write_text("{not json")
    with pytest.raises(LayoutError, match=r"SEED-Bench\.json: not valid JSON"):
        read_seedbench(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(LayoutError, match=r'expected \{"questions"'):
        read_seedbench(path)
    bad = _item("2", "Q", "A", 1)
    del bad["choice_c"]
    path.write_text(json.dumps({"questions": [_item("1", "Q", "A", 1), bad]}))
    with pytest.raises(LayoutError, match=r"SEED-Bench\.json: questions\[1\]: missing key\(s\) choice_c"):
        read_seedbench(path)
    path.write_text(json.dumps({"questions": [_item("1", "Q", "A", 1), _item("1", "Q2", "A", 1)]}))
    with pytest.raises(LayoutError, match=r"questions\[1\]: question_id '1' is also that of questions\[0\]"):
        read_seedbench(path)
    path.write_text(json.dumps({"questions": [_item("1", "Q", "E", 1)]}))
    with pytest.raises(LayoutError, match=r"questions\[0\]: answer is 'E'"):
        read_seedbench(path)
    path.write_text(json.dumps({"questions": [_item("1", "Q", "A", 10, data_type="video")]}))
    with pytest.raises(LayoutError, match="no image questions"):
        read_seedbench(path)


def test_missing_image_names_the_row_and_data_id(tmp_path):
    root = _write(tmp_path / "seed", [_item("1", "Q", "A", 1, data_id="gone.jpg")], images=())
    with pytest.raises(LayoutError, match=r"questions\[0\]: data_id gone\.jpg .*image not found"):
        evaluate_seedbench(LoglikAnswerer({"Q": [0, 0, 0, 0]}), root, tmp_path / "out")


def test_dimension_names_are_those_of_dataset_md(tmp_path):
    # DATASET.md: 3 is Instance Attributes, 4 is Instance Location; a JSON without question_type gets them too
    root = tmp_path / "seed"
    _write(root, [_item("1", "What colour?", "A", 3), _item("2", "Where?", "B", 4)])
    doc = json.loads((root / "SEED-Bench.json").read_text())
    del doc["question_type"]
    (root / "SEED-Bench.json").write_text(json.dumps(doc))
    result = evaluate_seedbench(LoglikAnswerer({"What colour?": [0, -1, -1, -1], "Where?": [0, -1, -1, -1]}), root, tmp_path / "out")
    assert result["dimensions"]["Instance Attributes"]["id"] == 3
    assert result["dimensions"]["Instance Location"]["id"] == 4


def test_seedbench_resumes_and_batches(tmp_path):
    root = _write(tmp_path / "seed", [_item(str(i), f"Q{i}", "A", 1) for i in range(5)])
    scores = {f"Q{i}": [0.0, -1.0, -1.0, -1.0] for i in range(5)}
    first = LoglikAnswerer(scores)
    evaluate_seedbench(first, root, tmp_path / "out", limit=3, batch_size=2)
    again = LoglikAnswerer(scores)
    result = evaluate_seedbench(again, root, tmp_path / "out", batch_size=2)
    assert [q for q, _ in again.calls] == ["Q3", "Q4"] and result["correct"] == 5
