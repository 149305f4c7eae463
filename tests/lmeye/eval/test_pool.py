"""`--workers N`: a Ray actor pool answers each call in N contiguous shards, put back in order."""

from __future__ import annotations

import sys
from functools import partial

from PIL import Image

from lmeye.eval.pool import PoolAnswerer, shards


def test_workers_split_each_call_into_contiguous_shards():
    assert shards(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shards(2, 4) == [(0, 1), (1, 2)]  # never an empty shard
    assert shards(5, 1) == [(0, 5)]


class Tagged:
    """Answers with its process id and the question; ranks the first choice highest."""

    name = "tagged"

    def answer(self, images, questions):
        import os

        return [f"{os.getpid()}:{q}:{image.size[0]}" for image, q in zip(images, questions)]

    def choice_loglik(self, images, questions, choices):
        return [[0.0] + [-1.0] * (len(c) - 1) for c in choices]


def _tagged() -> Tagged:
    return Tagged()


def test_a_pool_of_actors_answers_in_order(ray_local):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import tests/
    pool = PoolAnswerer(partial(_tagged), workers=2, name="tagged")
    images = [Image.new("RGB", (n + 1, 2)) for n in range(5)]
    answers = pool.answer(images, [f"q{n}" for n in range(5)])
    assert [a.split(":", 1)[1] for a in answers] == [f"q{n}:{n + 1}" for n in range(5)]  # in order
    assert len({a.split(":")[0] for a in answers}) == 2  # two processes answered
    assert pool.choice_loglik(images[:2], ["a", "b"], [["x", "y"], ["x", "y", "z"]]) == [[0.0, -1.0], [0.0, -1.0, -1.0]]
