"""instruct.formats: a VQA source's questions asked as the benchmarks ask them (yes/no with balanced
negatives, multiple choice with distractors of the same question type, short answers)."""

from __future__ import annotations

from collections import Counter

import pytest

from lmeye.config import ConfigError, load_config
from lmeye.demo.corpus import qa_pairs, write_corpus
from lmeye.eval.mmbench import PROMPT_SUFFIX, build_prompt, extract_choice
from lmeye.tables import TableReader
from lingcloud_testing import build_features_table
from pipelines.instruct import run
from pipelines.instruct.formats import FORMATS, SHORT, YES_NO, AnswerPool, Formatter, question_type
from schemas.instructions import INSTRUCTIONS

QA = [("What colour is the circle?", c) for c in ("red", "green", "blue", "yellow")] + \
     [("How many shapes are there?", n) for n in ("1", "2", "3")]
ROLES = ("user", "assistant")


def test_question_type_is_the_first_words():
    assert question_type("What colour is the circle at the top?", 3) == "what colour is"
    assert question_type("How many?", 3) == "how many"


def test_yes_no_negatives_are_balanced_and_of_the_same_type():
    pool = AnswerPool(QA, words=3)
    f = Formatter({"yes_no": 1.0}, pool, seed=0, name="vqa")
    made = [f.apply("What colour is the circle?", "red", "vqa", f"a.json:record {i}", ROLES) for i in range(400)]
    assert {task for task, _ in made} == {"vqa_yes_no"}
    answers = Counter(turns[1][1] for _, turns in made)
    assert set(answers) == {"Yes", "No"} and 0.4 < answers["Yes"] / 400 < 0.6
    for _, turns in made:
        q, a = turns[0][1], turns[1][1]
        assert q.startswith("What colour is the circle? Is the answer ") and q.endswith(f"? {YES_NO}")
        candidate = q.split("Is the answer ")[1].split("?")[0]
        assert (candidate == "red") == (a == "Yes")
        assert candidate in {"red", "green", "blue", "yellow"}  # never a count


def test_multiple_choice_has_distractors_of_the_same_type_and_the_mmbench_prompt():
    pool = AnswerPool(QA, words=3)
    f = Formatter({"multiple_choice": 1.0}, pool, seed=1, name="vqa", distractors=3)
    letters = Counter()
    for i in range(200):
        task, turns = f.apply("How many shapes are there?", "2", "vqa", f"line {i}", ROLES)
        prompt, letter = turns[0][1], turns[1][1]
        options = [line[3:] for line in prompt.splitlines() if line[1:3] == ". "]
        assert task == "vqa_multiple_choice" and sorted(options) == ["1", "2", "3"]  # only two other counts exist
        assert prompt == build_prompt("How many shapes are there?", None, tuple(zip("ABC", options)))
        assert prompt.endswith(PROMPT_SUFFIX) and options["ABC".index(letter)] == "2"
        assert extract_choice(letter, tuple(zip("ABC", options))) == letter  # what the MMBench evaluator reads
        letters[letter] += 1
    assert set(letters) == {"A", "B", "C"}  # the right option moves


def test_multiple_choice_text_asks_the_same_prompt_and_replies_with_the_option_that_mmbench_reads_as_its_letter():
    pool = AnswerPool(QA, words=3)
    letter = Formatter({"multiple_choice": 1.0}, pool, seed=1, name="vqa")
    text = Formatter({"multiple_choice_text": 1.0}, pool, seed=1, name="vqa")
    for i in range(50):
        (task, ((_, prompt), (_, reply))) = text.apply("What colour is the circle?", "red", "vqa", f"line {i}", ROLES)
        _, ((_, same), (_, right)) = letter.apply("What colour is the circle?", "red", "vqa", f"line {i}", ROLES)
        options = tuple((line[0], line[3:]) for line in prompt.splitlines() if line[1:3] == ". ")
        assert task == "vqa_multiple_choice" and prompt == same and reply == "red"  # same task, prompt and options
        assert extract_choice(reply, options) == right  # VLMEvalKit's can_infer_text: the option's letter


def test_the_config_takes_every_format_the_formatter_knows():
    from lmeye.config.instruct import ANSWER_FORMATS

    assert ANSWER_FORMATS == FORMATS


def test_short_and_plain_and_a_type_without_other_answers():
    pool = AnswerPool([("Is it a cat?", "yes")], words=3)
    f = Formatter({"yes_no": 1.0}, pool, seed=0, name="vqa")
    # no other answer of the type: asked short, not as a yes/no question that would always be "Yes"
    assert f.apply("Is it a cat?", "yes", "vqa", "p", ROLES) == ("vqa", [("user", f"Is it a cat?\n{SHORT}"), ("assistant", "yes")])
    plain = Formatter({"plain": 1.0}, None, seed=0, name="vqa")
    assert plain.apply("Q?", "a", "vqa", "p", ROLES) == ("vqa", [("user", "Q?"), ("assistant", "a")])


def test_a_count_with_no_other_answer_of_its_type_contrasts_with_the_counts_next_to_it():
    # a corpus whose images all hold one shape: "1" is the only count it answers, and MME still asks "Is the answer 2?"
    pool = AnswerPool([("How many shapes are in the image?", "1"), ("What colour is the circle?", "red")], words=3)
    assert pool.others("How many shapes are in the image?", "1") == ["2", "3", "0"]
    assert AnswerPool([("How many dogs are there?", "0")], words=3).others("How many dogs are there?", " 0 ") == ["1", "2"]  # never below 0
    assert pool.others("What colour is the circle?", "red") == []  # a word has no neighbours
    assert AnswerPool([("What is the power?", "²")], words=3).others("What is the power?", "²") == []  # nor a non-ASCII digit
    f = Formatter({"yes_no": 1.0}, pool, seed=0, name="vqa")
    made = [f.apply("How many shapes are in the image?", "1", "vqa", f"r{i}", ROLES) for i in range(200)]
    asked = Counter((t[0][1].split("Is the answer ")[1].split("?")[0], t[1][1]) for _, t in made)
    assert {task for task, _ in made} == {"vqa_yes_no"} and set(asked) == {("1", "Yes"), ("2", "No"), ("3", "No"), ("0", "No")}
    assert 0.4 < asked[("1", "Yes")] / 200 < 0.6
    # a type that has other counts keeps drawing from them alone (the multiple-choice test above: 1, 2 and 3)
    assert AnswerPool(QA, words=3).others("How many shapes are there?", "2") == ["1", "3"]


def test_the_same_record_gets_the_same_format():
    pool = AnswerPool(QA, words=3)
    f = Formatter({"short": 1.0, "yes_no": 1.0, "multiple_choice": 1.0}, pool, seed=0, name="vqa")
    first = [f.apply("What colour is the circle?", "red", "vqa", f"r{i}", ROLES) for i in range(60)]
    again = [f.apply("What colour is the circle?", "red", "vqa", f"r{i}", ROLES) for i in range(60)]
    assert first == again and {t for t, _ in first} == {"vqa", "vqa_yes_no", "vqa_multiple_choice"}


def test_an_unknown_format_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="unknown format.*true_false"):
        load_config(None, {"data.root": str(tmp_path), "instruct.sources": [{"kind": "vqa", "path": "x.json", "formats": {"true_false": 1}}]})


def test_the_stage_writes_the_formats_of_a_vqa_source(tmp_path, make_pairs):
    _, pairs = make_pairs(num_images=12, corrupt=0, failed=0)
    corpus = write_corpus(tmp_path / "corpus", num_images=12)
    build_features_table(tmp_path / "features", pairs["uid"].to_pylist(), [])
    cfg = load_config(None, {
        "data.root": str(tmp_path), "instruct.val_fraction": 0.0,
        "instruct.sources": [{"kind": "vqa", "path": "{demo.corpus_dir}/annotations.json",
                              "formats": {"short": 1, "yes_no": 1, "multiple_choice": 1}}],
    })
    cfg.demo.corpus_dir = str(tmp_path / "corpus")
    run(cfg)
    rows = TableReader(cfg.instruct.output, INSTRUCTIONS).read().to_pylist()
    assert len(rows) == sum(len(qa_pairs(i)) for i in corpus.items)  # one row per record, in one format
    tasks = Counter(r["task"] for r in rows)
    assert set(tasks) == {"vqa", "vqa_yes_no", "vqa_multiple_choice"}, tasks
    for r in rows:
        q, a = r["conversation"][0]["content"], r["conversation"][1]["content"]
        if r["task"] == "vqa":
            assert q.endswith(SHORT)
        elif r["task"] == "vqa_yes_no":
            assert a in ("Yes", "No") and q.endswith(YES_NO)
        else:
            assert a in "ABCD" and q.endswith(PROMPT_SUFFIX)
