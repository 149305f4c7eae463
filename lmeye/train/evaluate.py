"""Validation at the end of a stage: loss and exact-match accuracy on this worker's shard.

Loss: the model's per-sample loss (mean over answer tokens) averaged over rows. Exact match: the
conversation up to its last assistant turn is the prompt (``ipn.encode(..., for_generation=True)``),
the answer is generated greedily, and it counts when it equals the last assistant turn after
``normalise`` (case, surrounding space and final punctuation). Counts are kept per task and summed
over the ranks (``validate``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, Optional

import numpy as np

from lmeye.train.data import to_device

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.strip().lower()).rstrip(".!? ")


def validate(engine: Any, ipn: Any, maker: Any, batch_size: int, device: Any, tc: Any, comm: Any,
             lockstep: bool) -> dict[str, Any]:
    """The stage's validation metrics over every rank's ``validation`` shard ({} when the stage has
    none). ``engine``: the DeepSpeed engine; ``comm``: the ranks' ``Collectives``."""
    import ray.train

    try:
        shard = ray.train.get_dataset_shard("validation")
    except KeyError:  # the stage has no validation rows (a small corpus's split can leave none)
        return {}
    local = evaluate(engine, ipn, maker, shard, batch_size, device, tc, comm if lockstep else None)
    return merge_counts(comm.gather(local))


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum every rank's validation counts (small dicts, gathered once) into the stage's metrics."""
    total: dict[str, float] = Counter()
    for p in parts:
        for k, v in p.items():
            total[k] += v
    out: dict[str, Any] = {}
    if total.get("val_loss_rows"):
        out["val_loss"] = total["val_loss_sum"] / total["val_loss_rows"]
    if total.get("val_rows"):
        out["val_exact_match"] = total["val_correct"] / total["val_rows"]
        out["val_rows"] = int(total["val_rows"])
    for k in sorted(total):
        if k.startswith("rows:"):
            task = k[5:]
            out[f"val_exact_match[{task}]"] = total[f"correct:{task}"] / total[k]
    return out


def evaluate(engine: Any, ipn: Any, maker: Any, shard: Any, batch_size: int, device: Any, tc: Any,
             comm: Optional[Any] = None) -> dict[str, float]:
    """This rank's validation counts. ``comm`` (ZeRO-3 with several ranks, whose weights are gathered
    collectively as each module runs): the ranks go batch by batch together until none has data
    left, a rank without a batch runs the maker's filler row (not counted), and generation runs
    until every rank's answers are done (``synced_gpus``), so shards of unequal size never hang."""
    import torch

    counts: Counter = Counter()
    was_training = engine.module.training
    engine.module.eval()
    tables = iter(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1))
    try:
        with torch.no_grad():
            while True:
                table = next(tables, None)
                if comm is not None:
                    if comm.sum([float(table is not None)])[0] == 0:
                        break
                elif table is None:
                    break
                _loss(engine, maker, table, device, tc, counts, lockstep=comm is not None)
                exact_match(ipn, maker, table, device, tc, counts, lockstep=comm is not None)
    finally:
        engine.module.train(was_training)
    return dict(counts)


def _loss(engine: Any, maker: Any, table: Any, device: Any, tc: Any, counts: Counter, lockstep: bool) -> None:
    batch = maker.prepare(table).batch if table is not None else None
    if batch is None and not lockstep:
        return
    out = engine(to_device(batch if batch is not None else maker.filler(), device, tc.precision))
    if batch is not None:
        per = out.per_sample_loss.detach().float()
        counts["val_loss_sum"] += float(per.sum())
        counts["val_loss_rows"] += int(per.numel())


def exact_match(ipn: Any, maker: Any, table: Any, device: Any, tc: Any, counts: Counter, lockstep: bool = False) -> None:
    """Greedy answers to the last assistant turn of ``table``'s rows (None: no rows, under ``lockstep``
    the filler's answer is generated and dropped), counted per task."""
    encs, answers, keep = [], [], []
    if table is not None:
        uids = [u or "" for u in table.column("uid").to_pylist()]
        convs = table.column("conversation").to_pylist()
        tasks = table.column("task").to_pylist()
        emb, patches, found = maker.features(uids)
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
    if not encs and not lockstep:
        return
    if encs:
        sel = np.asarray(keep)
        batch = maker.collate(encs, emb[sel], patches[sel] if patches is not None else None)
    else:
        batch = maker.filler(for_generation=True)
    texts = _generate(ipn, to_device(batch, device, tc.precision), tc.val_max_new_tokens, lockstep)
    for i, text, answer in zip(keep, texts, answers):
        ok = int(normalise(text) == normalise(answer))
        counts["val_rows"] += 1
        counts["val_correct"] += ok
        counts[f"rows:{tasks[i]}"] += 1
        counts[f"correct:{tasks[i]}"] += ok


def _generate(ipn: Any, batch: dict[str, Any], max_new_tokens: int, lockstep: bool) -> list[str]:
    if not lockstep:
        return ipn.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    import deepspeed

    # generate is not the IPN's forward, so ZeRO-3's hooks do not gather the IPN's own top-level
    # weights (<img-q>, <img>, <img-d> embeddings); its submodules gather theirs as they run
    with deepspeed.zero.GatheredParameters(list(ipn.parameters(recurse=False)), modifier_rank=None):
        return ipn.generate(batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, synced_gpus=True)
