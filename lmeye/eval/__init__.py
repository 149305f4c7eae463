"""Benchmark evaluation: MME, MMBench and SEED-Bench (image) on their released layouts.

Each benchmark module has a reader (the released layout; a wrong layout is a ``LayoutError`` naming
the path and row), a pure scorer over answered items, a Markdown renderer and ``evaluate`` that runs
an ``Answerer`` and writes ``<name>.json`` + ``<name>.md``. The model side is the ``Answerer``
protocol (``lmeye.eval.common``); the IPN adapter is ``lmeye.eval.ipn_answerer``.
"""

BENCHMARKS = ("mme", "mmbench", "seedbench")
