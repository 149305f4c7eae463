"""The reader or the path through the LLM? ``patch_locality``'s probe as the IPN's RVII. Stage 2 alone, no Ray.

    python benchmarks/ipn_reader.py --root DEMO_ROOT --llm LLM_DIR [--query request words] [--answer-loss 10]
        [--steps 3000] [--schedule constant] [--val 400]

On images with 1-3 shapes ``benchmarks/patch_locality.py``'s probe (the question as a bag of words, one
cross-attention over the 64 standardised patch tokens, each with a learned position, an MLP reading a class
out) reaches 0.90 held-out in 3,000 steps, while the IPN stays near 0.7 (README, "Images with 1-3 shapes").
This puts that probe's reader in RVII's place (``ipn.rvii`` is swapped for ``ProbeReader``; everything else
is ``configs/demo.yaml``'s IPN around the frozen demo LLM) and trains stage 2 as ``benchmarks/ipn_formats.py``
does, on the plain questions, so that what is left between the two is what the IPN adds:

* ``--query request``: the reader's query is the LLM's hidden state at ``<img-q>`` (through RVII's request
  projection, then standardised per dimension by a BatchNorm, as the probe's inputs are), LMEye's request;
  ``words``: the probe's own query, the prompt's tokens as a bag (not an IPN: the question in the clear);
* the answer reaches the loss through the ``<img-d>`` slots and the frozen LLM; ``--answer-loss W`` adds W x
  a class read-out on the slots themselves (their mean against the LLM's input-embedding table, the cross-
  entropy of each answer token: the probe's loss, through the transmission);
* ``--schedule``: the demo's cosine, or the probe's constant rate.

Prints the held-out exact match per question type (and, with ``--json``, per question form); the probe's own
figure on the same questions and steps: ``patch_locality.py --root ROOT --layers table --questions
"What,Where,How" --steps 3000 --standardize``. Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import ipn_formats as stage2  # noqa: E402
from lmeye.model.build import build_ipn  # noqa: E402
from lmeye.model.text import IGNORE  # noqa: E402
from patch_locality import Probe  # noqa: E402


class ProbeReader(nn.Module):
    """``patch_locality.Probe`` with RVII's interface: (request (B, k, width), tokens (B, T, W)) -> (B, k, out_dim),
    the tokens standardised with the corpus's ``mean`` and ``std``. The query is the request, standardised per
    dimension by a BatchNorm; with ``vocab`` set, the bag of ``self.prefix_ids`` (set per batch) instead."""

    def __init__(self, request_width: int, out_dim: int, tokens: int, width: int, mean: np.ndarray, std: np.ndarray,
                 vocab: int = 0):
        super().__init__()
        self.request_width, self.out_dim, self.vocab = request_width, out_dim, vocab
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.request_norm = nn.BatchNorm1d(request_width, affine=False)
        self.probe = Probe(vocab or request_width, width, tokens, out_dim, center=False)
        self.prefix_ids: torch.Tensor | None = None

    def forward(self, request: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        b, k, w = request.shape
        tokens = (image_tokens - self.mean) / self.std
        if self.vocab:  # one query for every slot: read once
            bag = torch.zeros(b, self.vocab, device=request.device).scatter_(1, self.prefix_ids.clamp(min=0), 1.0)
            return self.probe.read(bag[:, None], tokens).expand(-1, k, -1)
        return self.probe.read(self.request_norm(request.reshape(b * k, w)).view(b, k, w), tokens)


def install_reader(ipn, patches: np.ndarray, query: str) -> dict:
    """Swap ``ipn.rvii`` for a ProbeReader; returns a dict whose "img_d" holds the last batch's <img-d>
    embeddings (for the answer loss). The IPN's ``_img_d`` is wrapped on this instance to see each batch."""
    flat = patches.reshape(-1, patches.shape[2]).astype(np.float32)
    vocab = ipn.llm.get_input_embeddings().weight.shape[0] if query == "words" else 0
    reader = ProbeReader(ipn.rvii.request_width, ipn.rvii.out_dim, patches.shape[1], patches.shape[2],
                         flat.mean(0), flat.std(0) + 1e-6, vocab)
    ipn.rvii = reader
    seen: dict = {}
    img_d = ipn._img_d

    def reading(batch, *args, **kwargs):
        reader.prefix_ids = batch["prefix_ids"] * batch["prefix_mask"]  # pads -> token 0, as constant as the template
        seen["img_d"] = img_d(batch, *args, **kwargs)
        return seen["img_d"]

    ipn._img_d = reading
    return seen


def answer_loss(ipn, seen: dict, weight: float):
    """``weight`` x the cross-entropy of each answer token (its </s> aside) from the mean <img-d> slot against
    the LLM's input-embedding table: a class read-out on the slots, the probe's loss, through the transmission."""
    table = ipn.llm.get_input_embeddings().weight.detach()
    eos = ipn.tokenizer.eos_token_id

    def loss(batch: dict) -> torch.Tensor:
        labels = batch["decoder_labels"] if "decoder_labels" in batch else batch["labels"]
        keep = (labels != IGNORE) & (labels != eos)
        logp = (seen["img_d"].mean(1) @ table.T).log_softmax(-1)
        return weight * (-(logp.gather(1, labels.clamp(min=0)) * keep).sum() / keep.sum().clamp(min=1))

    return loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="a finished demo run's data.root (up to 3 shapes: --set demo.max_objects=3)")
    ap.add_argument("--llm", required=True, help="the run's demo LLM (ROOT/models/lingcloud-tiny-t5)")
    ap.add_argument("--query", nargs="+", default=["request", "words"], choices=["request", "words"])
    ap.add_argument("--answer-loss", type=float, default=0.0, help="weight of the class read-out on the <img-d> slots")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=stage2.LR)
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    ap.add_argument("--val", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    index, emb, patches = stage2.load_features(args.root)
    train_rows = [r for r in stage2.load_questions(args.root, "train") if r["uid"] in index]
    val = [r for r in stage2.load_questions(args.root, "validation") if r["uid"] in index]
    val = random.Random(stage2.SEED).sample(val, min(args.val, len(val)))
    rows = [{"uid": r["uid"], "conversation": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in train_rows]
    print(f"{len(rows)} training questions, {len(val)} held-out", flush=True)
    results = {}
    for query in args.query:
        torch.manual_seed(stage2.SEED)
        ipn = build_ipn(stage2.model_config(args.root, args.llm, "clip_text", "last"), emb.shape[1], patches.shape[1:])
        seen = install_reader(ipn, patches, query)
        extra = answer_loss(ipn, seen, args.answer_loss) if args.answer_loss else None
        t0 = time.time()
        losses = stage2.train(ipn, rows, args.steps, index, emb, patches, log_every=500, lr=args.lr, schedule=args.schedule,
                              extra_loss=extra)
        results[query] = stage2.evaluate_plain(ipn, val, index, emb, patches) | {"train_s": time.time() - t0,
                                                                               "final_loss": float(np.mean(losses[-50:]))}
        print(json.dumps(results[query]), flush=True)
    kinds = ["all", "background", "colour", "count", "position", "shape"]
    print(f"\n{args.steps} steps, {args.schedule} {args.lr:g}, answer loss {args.answer_loss:g}; held-out exact match")
    print("| query | " + " | ".join(kinds) + " | train s |\n| --- |" + " --- |" * (len(kinds) + 1))
    for query, r in results.items():
        print(f"| {query} | " + " | ".join(f"{r['plain'].get(k, float('nan')):.3f}" for k in kinds) + f" | {r['train_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
