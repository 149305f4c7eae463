"""`lmeye eval`: builds the answerer through the one factory, writes results, reports bad layouts in one line."""

from __future__ import annotations

import json

from lmeye.cli import main
from lmeye.eval import ipn_answerer


class FirstChoice:
    name = "first"

    def answer(self, images, questions):
        return ["Yes"] * len(questions)

    def choice_loglik(self, images, questions, choices):
        return [[0.0] + [-1.0] * (len(c) - 1) for c in choices]


def _seed(tmp_path):
    from PIL import Image

    (tmp_path / "SEED-Bench-image").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "SEED-Bench-image" / "a.jpg")
    item = {"question": "Q", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "A",
            "question_type_id": 2, "data_id": "a.jpg", "data_type": "image", "question_id": "1"}
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"questions": [item, dict(item, answer="B", question_id="2")]}))
    return tmp_path / "SEED-Bench.json"


def test_eval_command_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    built = []
    monkeypatch.setattr(ipn_answerer, "build_answerer", lambda ckpt, max_new_tokens, features=None: built.append(ckpt) or FirstChoice())
    data = _seed(tmp_path)
    assert main(["eval", "seedbench", "--checkpoint", "ckpt", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert built == ["ckpt"]
    result = json.loads((tmp_path / "out" / "seedbench.json").read_text())
    assert result["overall"] == 0.5
    assert "SEED-Bench 50.00% (1/2; 0 video items left out)" in capsys.readouterr().out


def test_bad_layout_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ipn_answerer, "build_answerer", lambda ckpt, max_new_tokens, features=None: FirstChoice())
    (tmp_path / "x.tsv").write_text("index\tquestion\n1\tQ\n")
    assert main(["eval", "mmbench", "--checkpoint", "c", "--data", str(tmp_path / "x.tsv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmeye eval: error: ") and "x.tsv:1: missing column(s)" in err and "\n" not in err


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["eval", "mme", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path)]) == 2
    assert "nope: checkpoint folder not found" in capsys.readouterr().err


def test_batch_size_and_workers_must_be_positive(tmp_path, capsys):
    assert main(["eval", "mme", "--checkpoint", "c", "--data", str(tmp_path), "--batch-size", "0"]) == 2
    assert "--batch-size and --workers must be at least 1" in capsys.readouterr().err


def test_workers_check_the_checkpoint_before_starting_ray(tmp_path, capsys):
    assert main(["eval", "mme", "--checkpoint", str(tmp_path / "gone"), "--data", str(tmp_path), "--workers", "2"]) == 2
    assert "gone: checkpoint folder not found" in capsys.readouterr().err
