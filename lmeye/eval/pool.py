"""``lmeye eval --workers N``: the questions of each call spread over N Ray actors, each holding its
own copy of the model (one per GPU on a GPU node), so a real benchmark's size (MME: 2,374 questions)
is answered N batches at a time."""

from __future__ import annotations

from typing import Any, Callable, Sequence


class _Worker:
    """One actor: the answerer ``build()`` makes (``lmeye eval``: ``build_answerer`` on the checkpoint)."""

    def __init__(self, build: Callable[[], Any]):
        self.answerer = build()

    def answer(self, images: list, questions: list[str]) -> list[str]:
        return self.answerer.answer(images, questions)

    def choice_loglik(self, images: list, questions: list[str], choices: list[list[str]]) -> list[list[float]]:
        return self.answerer.choice_loglik(images, questions, choices)


def shards(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, non-empty (start, end) ranges covering ``range(n)``, sizes differing by one at most."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class PoolAnswerer:
    """The ``Answerer`` protocol over a pool of ``_Worker`` actors: each call is cut into one contiguous
    shard per actor, answered concurrently, and put back together in order. ``build`` is shipped to
    each actor (a picklable callable, e.g. a ``functools.partial`` of ``build_answerer``); ``name``
    is the model's, for resuming."""

    def __init__(self, build: Callable[[], Any], workers: int, name: str, gpus_per_worker: float = 0):
        import ray

        actor = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(_Worker)
        self.actors = [actor.remote(build) for _ in range(workers)]
        self.name = name

    def _spread(self, method: str, *columns: Sequence[Any]) -> list:
        import ray

        refs = [getattr(actor, method).remote(*(list(c[a:b]) for c in columns))
                for actor, (a, b) in zip(self.actors, shards(len(columns[0]), len(self.actors)))]
        return [x for part in ray.get(refs) for x in part]

    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        return self._spread("answer", images, questions)

    def choice_loglik(self, images: Sequence[Any], questions: Sequence[str], choices: Sequence[Sequence[str]]) -> list[list[float]]:
        return self._spread("choice_loglik", images, questions, choices)
