"""The demo's benchmark-layout sets: true to the images, read back by the benchmark readers, and
scored 100% by an answerer that knows the truth (so the whole eval path works on them)."""

from __future__ import annotations

import dataclasses

import pytest

from lmeye.demo.benchsets import (
    MME_SUBTASKS,
    QUESTION_TYPES,
    SEED_DIMENSION,
    accuracy_by_type,
    heldout_items,
    write_benchsets,
)
from lmeye.demo.corpus import generate_items, qa_pairs
from lmeye.eval.mme import read_mme
from lmeye.eval.mmbench import read_mmbench
from lmeye.eval.run import evaluate_all
from lmeye.eval.seedbench import read_seedbench

NUM = 5


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    training = generate_items(32, seed=0)
    items = heldout_items(NUM, seed=1000, exclude=training)
    return items, write_benchsets(tmp_path_factory.mktemp("bench"), items, image_size=48, seed=3)


class Oracle:
    """Answers from the corpus's own truth, keyed by the decoded image and the question."""

    name = "oracle"

    def __init__(self, truth: dict[tuple[bytes, str], str]):
        self.truth = truth

    def answer(self, images, prompts):
        out = []
        for image, prompt in zip(images, prompts):
            question = next(line for line in prompt.splitlines() if line.endswith("?") or "Please answer" in line)
            out.append(self.truth[(image.tobytes(), question)])
        return out

    def choice_loglik(self, images, questions, choices):
        rights = [self.truth[(image.tobytes(), q)] for image, q in zip(images, questions)]
        return [[0.0 if c == right else -5.0 for c in options] for right, options in zip(rights, choices)]


def test_heldout_items_are_new_scenes_with_their_own_names():
    training = generate_items(32, seed=0)
    items = heldout_items(20, seed=0, exclude=training)  # same seed: every training scene must be skipped
    assert len(items) == 20 and [i.name for i in items][:2] == ["eval_00000.jpg", "eval_00001.jpg"]
    assert not {(i.objects, i.background) for i in items} & {(i.objects, i.background) for i in training}


def test_sets_read_back_through_the_benchmark_readers(sets):
    items, paths = sets
    mme = read_mme(paths.mme)
    assert len(mme) == NUM * len(MME_SUBTASKS) * 2
    for subtask in MME_SUBTASKS:  # each image: one true and one false statement per subtask
        assert sorted(q.truth for q in mme if q.subtask == subtask) == ["No"] * NUM + ["Yes"] * NUM

    truth = {item.name: {qa["question"]: qa["answer"] for qa in qa_pairs(item)} for item in items}
    seed = read_seedbench(paths.seedbench)
    questions, names = seed.questions, seed.names
    assert {q.type_id for q in questions} <= set(SEED_DIMENSION.values())
    assert names[SEED_DIMENSION["count"]] == "Instances Counting"
    # SEED-Bench DATASET.md: 3 is Instance Attributes, 4 is Instance Location
    assert (names[SEED_DIMENSION["colour"]], names[SEED_DIMENSION["position"]]) == ("Instance Attributes", "Instance Location")
    for q in questions:  # the right choice is the corpus's answer to that question about that image
        assert q.choices["ABCD".index(q.answer)] == truth[q.image_path.name][q.question]
        assert len(set(q.choices)) == 4

    mmb = read_mmbench(paths.mmbench)
    assert len(mmb) == len(questions)
    assert {q.category for q in mmb} == set(QUESTION_TYPES)
    assert [dict(q.options)[q.answer] for q in mmb] == [q.choices["ABCD".index(q.answer)] for q in questions]


def test_an_oracle_scores_full_marks(sets, tmp_path):
    from lmeye.eval.common import open_image

    items, paths = sets
    truth: dict[tuple[bytes, str], str] = {}
    for q in read_mme(paths.mme):
        truth[(open_image(q.image_path, "").tobytes(), q.question)] = q.truth
    for q in read_seedbench(paths.seedbench).questions:
        truth[(open_image(q.image_path, "").tobytes(), q.question)] = q.choices["ABCD".index(q.answer)]

    scores = evaluate_all(Oracle(truth), dataclasses.asdict(paths), tmp_path, batch_size=16)
    assert scores["mme"]["perception"] == pytest.approx(200.0 * len(MME_SUBTASKS))
    assert scores["mmbench"]["overall"] == 1.0  # answered by option text
    seed = scores["seedbench"]
    assert seed["overall"] == 1.0
    by_type = accuracy_by_type(seed)
    assert set(by_type) >= {"count", "background", "shape", "colour"} and set(by_type.values()) == {1.0}
