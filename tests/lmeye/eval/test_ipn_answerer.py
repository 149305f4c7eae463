"""The IPN adapter calls the contract's encode / collate / generate / score_choices as specified."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lmeye.errors import UserError
from lmeye.eval.ipn_answerer import IPNAnswerer


class FakeIPN:
    def __init__(self, fits: bool = True):
        self.fits = fits
        self.calls: list[tuple] = []

    def encode(self, conversation, has_image, for_generation=False):
        self.calls.append(("encode", conversation, has_image, for_generation))
        return {"ids": [1, 2]} if self.fits else None

    def collate(self, encs, embeddings, patch_tokens):
        self.calls.append(("collate", embeddings.copy(), patch_tokens))
        return {"encs": encs}

    def generate(self, batch, **kwargs):
        self.calls.append(("generate", kwargs))
        return ["a red circle"] * len(batch["encs"])

    def score_choices(self, conversation, choices, embedding=None, patch_tokens=None):
        # the real IPN's signature: the conversation up to the user's turn, features of one image
        self.calls.append(("score_choices", conversation, embedding, patch_tokens))
        if not self.fits:
            raise UserError("a choice does not fit the model's 8 tokens")
        return np.array([-len(c) for c in choices], dtype=np.float32)


FEATURIZED: list = []


def _featurize(images):
    FEATURIZED.append(list(images))
    return [(np.full(3, 0.5, np.float32), np.ones((2, 3), np.float32)) for _ in images]


def test_answer_with_and_without_an_image():
    ipn = FakeIPN()
    answerer = IPNAnswerer(ipn, _featurize, feature_dim=3, max_new_tokens=7)
    assert answerer.answer([Image.new("RGB", (4, 4))], ["What is it?"]) == ["a red circle"]
    _, conversation, has_image, for_generation = ipn.calls[0]
    assert conversation == [{"role": "user", "content": "What is it?"}] and has_image and for_generation
    assert ipn.calls[1][1].shape == (1, 3) and ipn.calls[1][2].shape == (1, 2, 3)
    assert ipn.calls[2][1] == {"max_new_tokens": 7, "do_sample": False, "num_beams": 1}

    ipn.calls.clear()
    assert answerer.answer([None], ["Hello?"]) == ["a red circle"]
    assert ipn.calls[0][2] is False
    assert np.array_equal(ipn.calls[1][1], np.zeros((1, 3))) and ipn.calls[1][2] is None


def test_a_batch_is_one_generate_call_and_each_image_is_featurized_once():
    ipn = FakeIPN()
    answerer = IPNAnswerer(ipn, _featurize, feature_dim=3)
    image, other = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4))
    FEATURIZED.clear()
    assert answerer.answer([image, image, None, other], ["Q1", "Q2", "Q3", "Q4"]) == ["a red circle"] * 4
    assert [len(call) for call in FEATURIZED] == [2]  # one encoder call, the two distinct images
    collate = [c for c in ipn.calls if c[0] == "collate"]
    assert len(collate) == 1 and collate[0][1].shape == (4, 3) and collate[0][2].shape == (4, 2, 3)
    assert np.array_equal(collate[0][1][2], np.zeros(3))  # the text-only row
    assert sum(c[0] == "generate" for c in ipn.calls) == 1


def test_choice_loglik_and_prompts_that_do_not_fit():
    answerer = IPNAnswerer(FakeIPN(), _featurize, feature_dim=3)
    assert answerer.choice_loglik([Image.new("RGB", (4, 4))], ["Q"], [["ab", "c"]]) == [[-2.0, -1.0]]
    too_long = IPNAnswerer(FakeIPN(fits=False), _featurize, feature_dim=3)
    assert too_long.answer([None], ["Q"]) == [""]
    assert too_long.choice_loglik([None], ["Q"], [["a", "b"]]) == [[float("-inf")] * 2]
