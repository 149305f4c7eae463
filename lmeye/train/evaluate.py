"""Validation at the end of a stage: loss and exact-match accuracy on this worker's shard.

Loss: the model's per-sample loss (mean over answer tokens) averaged over rows. Exact match: the
conversation up to its last assistant turn is the prompt (``ipn.encode(..., for_generation=True)``),
the answer is generated greedily, and it counts when it equals the last assistant turn after
``normalise`` (case, surrounding space and final punctuation). Counts come back per task, summed
over ranks by the loop.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower()).rstrip(".!? ")


def evaluate(engine: Any, ipn: Any, maker: Any, shard: Any, batch_size: int, device: Any, tc: Any) -> dict[str, float]:
    import torch

    from lmeye.train.loop import _to_device

    counts: Counter = Counter()
    was_training = engine.module.training
    engine.module.eval()
    try:
        with torch.no_grad():
            for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
                prep = maker.prepare(table)
                if prep.batch is not None:
                    out = engine(_to_device(prep.batch, device, tc.precision))
                    per = out.per_sample_loss.detach().float()
                    counts["val_loss_sum"] += float(per.sum())
                    counts["val_loss_rows"] += int(per.numel())
                _exact_match(ipn, maker, table, device, tc, counts)
    finally:
        engine.module.train(was_training)
    return dict(counts)


def _exact_match(ipn: Any, maker: Any, table: Any, device: Any, tc: Any, counts: Counter) -> None:
    from lmeye.train.loop import _to_device

    uids = [u or "" for u in table.column("uid").to_pylist()]
    convs = table.column("conversation").to_pylist()
    tasks = table.column("task").to_pylist()
    emb, patches, found = maker.features(uids)
    encs, answers, keep = [], [], []
    for i in np.flatnonzero(found):
        conv = convs[i]
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            continue
        enc = ipn.encode(conv[:-1], has_image=bool(uids[i]), for_generation=True)
        if enc is None:
            continue
        encs.append(enc)
        answers.append(conv[-1]["content"])
        keep.append(i)
    if not encs:
        return
    sel = np.asarray(keep)
    batch = ipn.collate(encs, emb[sel], patches[sel] if patches is not None else None)
    texts = ipn.generate(_to_device(batch, device, tc.precision), max_new_tokens=tc.val_max_new_tokens,
                         do_sample=False, num_beams=1)
    for i, text, answer in zip(sel, texts, answers):
        ok = int(normalise(text) == normalise(answer))
        counts["val_rows"] += 1
        counts["val_correct"] += ok
        counts[f"rows:{tasks[i]}"] += 1
        counts[f"correct:{tasks[i]}"] += ok
