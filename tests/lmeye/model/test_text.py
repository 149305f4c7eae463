"""Conversations -> ids: slots, the loss mask on assistant turns, the truncation rule."""

from __future__ import annotations

import pytest

from lmeye.errors import UserError
from lmeye.model.text import IGNORE, IMG, IMG_D, IMG_Q, TextCodec

CONV = [
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the background?"},
    {"role": "assistant", "content": "white"},
]


def codec(tokenizer, **kw) -> TextCodec:
    return TextCodec(tokenizer, **{"num_img": 2, "num_img_d": 5, "max_length": 128, **kw})


def answer_texts(tokenizer, enc) -> list[str]:
    """The labelled stretches of the suffix, decoded."""
    out, run = [], []
    for tok, lab in zip(enc["suffix_ids"], enc["labels"]):
        if lab != IGNORE:
            run.append(tok)
        elif run:
            out.append(tokenizer.decode(run))
            run = []
    return out + ([tokenizer.decode(run)] if run else [])


def test_slots_and_loss_mask_cover_assistant_turns_only(tokenizer):
    enc = codec(tokenizer).encode(CONV, has_image=True)
    assert enc["prefix_ids"].count(IMG) == 2 and enc["prefix_ids"][-1] == IMG_Q
    assert enc["suffix_ids"][:5] == [IMG_D] * 5 and IMG_D not in enc["suffix_ids"][5:]
    assert answer_texts(tokenizer, enc) == ["red<|end|>", "white<|end|>"]
    # the image precedes the user's text inside the first user turn, the request follows it
    text = tokenizer.decode([t for t in enc["prefix_ids"] if t >= 0])
    assert text == "<s><|user|>\nWhat colour is the circle?"


def test_text_only_sample_has_no_slots(tokenizer):
    enc = codec(tokenizer).encode(CONV, has_image=False)
    assert all(t >= 0 for t in enc["prefix_ids"] + enc["suffix_ids"])
    assert answer_texts(tokenizer, enc) == ["red<|end|>", "white<|end|>"]


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    enc = codec(tokenizer).encode(CONV[:1], has_image=True, for_generation=True)
    assert all(lab == IGNORE for lab in enc["labels"])
    assert tokenizer.decode(enc["suffix_ids"][5:]) == "<|end|>\n<|assistant|>\n"


def test_truncation_cuts_the_tail_and_counts(tokenizer):
    full = codec(tokenizer).encode(CONV, has_image=True)
    total = len(full["prefix_ids"]) + len(full["suffix_ids"])
    c = codec(tokenizer, max_length=total - 3)
    enc = c.encode(CONV, has_image=True)
    assert len(enc["prefix_ids"]) + len(enc["suffix_ids"]) == total - 3
    assert enc["suffix_ids"] == full["suffix_ids"][:-3]
    assert c.counts["truncated"] == 1


def test_never_drops_the_first_answer_token_silently(tokenizer):
    full = codec(tokenizer).encode(CONV, has_image=True)
    first = next(i for i, x in enumerate(full["labels"]) if x != IGNORE)
    keep = len(full["prefix_ids"]) + first  # one short of the first answer token
    c = codec(tokenizer, max_length=keep)
    assert c.encode(CONV, has_image=True) is None
    assert c.counts["too_long"] == 1
    assert codec(tokenizer, max_length=keep + 1).encode(CONV, has_image=True)["labels"][-1] != IGNORE


def test_bad_conversations_are_user_errors(tokenizer):
    with pytest.raises(UserError, match="start with a user turn"):
        codec(tokenizer).encode(CONV[1:], True)
    with pytest.raises(UserError, match="end with an assistant turn"):
        codec(tokenizer).encode(CONV[:3], True)


class _WrapperOnly:
    """The tokenizer without its Rust backend: TextCodec then calls the transformers wrapper."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        if name == "backend_tokenizer":
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_the_backend_tokenises_exactly_as_the_wrapper(tokenizer):
    assert getattr(tokenizer, "backend_tokenizer", None) is not None  # the fast path is the one under test
    texts = ["What colour is the circle?", " leading space", "two\nlines\n", "ünïcödé — dashes", "  ", "red<|end|>\n"]
    fast, wrapped = codec(tokenizer), codec(_WrapperOnly(tokenizer))
    for t in texts:
        assert fast.ids_and_offsets(t) == wrapped.ids_and_offsets(t)
        assert fast.ids_and_offsets(t)[0] == tokenizer(t, add_special_tokens=False)["input_ids"]
    for conv, has_image in ((CONV, True), (CONV, False), (CONV[:1], True)):
        gen = conv[-1]["role"] == "user"
        assert fast.encode(conv, has_image, gen) == wrapped.encode(conv, has_image, gen)
