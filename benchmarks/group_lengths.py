"""train.group_by_length's sort key: each row's text length in Arrow against the same sum over ``to_pylist()``.

    python benchmarks/group_lengths.py [--rows 256 4096 32768] [--repeats 20]

A worker sorts every group of ``train.group_by_length`` micro-batches' rows by the characters of their
conversation (``lmeye.train.feed.text_lengths``). The rows are the demo's stage-2 mix (a plain question in
two, a yes/no question in three, a multiple-choice prompt in seven, multi-byte text among them), as a table
of two chunks, which is how a Ray Data batch can arrive. Prints, per group size, the best of ``--repeats``
for each and their ratio; the two must agree on every row.
"""

from __future__ import annotations

import argparse
import random
import sys
import timeit
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmeye.train.feed import text_lengths  # noqa: E402

PROMPTS = ("What colour is the circle?", "Is the square green? Please answer yes or no.",
           "Where is the red triangle?\nA. top left\nB. centre\nC. bottom right\nD. top right\n"
           "Answer with the option's letter from the given choices directly.", "¿Dónde está el círculo rojo? 日本")


def table(rows: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    convs = [[{"role": "user", "content": rng.choice(PROMPTS)}, {"role": "assistant", "content": rng.choice(("red", "Yes", "top left"))}]
             for _ in range(rows)]
    half = rows // 2
    return pa.concat_tables([pa.table({"conversation": convs[:half]}), pa.table({"conversation": convs[half:]})])


def python_lengths(t: pa.Table) -> np.ndarray:
    return np.array([sum(len(m["content"] or "") for m in c or ()) for c in t.column("conversation").to_pylist()])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 4096, 32768])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    print("| rows | to_pylist sum (ms) | Arrow (ms) | ratio |\n| --- | --- | --- | --- |")
    for rows in args.rows:
        t = table(rows)
        if python_lengths(t).tolist() != text_lengths(t).tolist():
            print(f"{rows} rows: the two sums differ", file=sys.stderr)
            return 1
        slow, fast = (min(timeit.repeat(lambda fn=fn: fn(t), number=1, repeat=args.repeats)) for fn in (python_lengths, text_lengths))
        print(f"| {rows:,} | {slow * 1e3:.2f} | {fast * 1e3:.2f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
