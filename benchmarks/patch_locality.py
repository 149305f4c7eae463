"""Do the patch tokens still say what is where? A probe trained on each ViT layer's tokens, no LLM, no Ray.

    python benchmarks/patch_locality.py --root DEMO_ROOT [--layers table,embed,0] [--steps 1000]
        [--questions "What colour is the shape"] [--center]

``DEMO_ROOT`` is a finished ``lmeye demo`` run (its ``pairs`` and ``features`` tables and its CLIP in
``models/``). For each layer the images' patch tokens are computed again by the demo's CLIP: ``embed`` is the
patch embedding the first block reads (positions added, ``ln_pre``), ``k`` the output of block k, ``table``
the features table's tokens as the extract stage wrote them (the last block, after ``ln_post``);
``--standardize`` scales each dimension to zero mean and unit variance over the corpus first. A probe is
trained on the training split's questions that start with one of ``--questions`` (comma-separated) and
scored on the validation split's: the question as a bag of words is the query of one cross-attention over
the tokens (each with a learned position embedding), and an MLP reads the answer out. Batch 64, AdamW 1e-3,
seeded. It is the IPN's task with the request handed over in the clear and no frozen LLM in the way, so it
shows what the features allow. Prints held-out accuracy by step per layer, each layer's final accuracy
over the table's, and the final accuracy per question type (the learning check's types: with
``--questions "What,Where,How"`` every form of the corpus, the bar the IPN is held to).
"""

from __future__ import annotations

import argparse
import glob
import io
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ipn_formats import load_features, load_questions  # noqa: E402
from lmeye.demo.learning_check import question_type  # noqa: E402
from lmeye.model.rvii import center_tokens  # noqa: E402

BATCH, LR, SEED = 64, 1e-3, 0


def layer_tokens(root: Path, index: dict[str, int], layers: list[str], model: str) -> dict[str, np.ndarray]:
    """layer name -> (N, T, width) tokens of every image of ``index``, in its row order."""
    from lmeye.clip import load_visual

    visual, preprocess = load_visual(model, str(root / "models" / f"{model}.safetensors"),
                                     config_dirs=[str(ROOT / "configs" / "models")], output_tokens=True)
    images = {}
    for shard in sorted(glob.glob(str(root / "pairs" / "*.parquet"))):
        for r in pq.read_table(shard, columns=["uid", "status", "image"]).to_pylist():
            if r["uid"] in index and r["status"] == "success":
                images[r["uid"]] = r["image"]
    order = sorted(index, key=index.get)
    out: dict[str, list] = {name: [] for name in layers}
    block_names = [name for name in layers if name.lstrip("-").isdigit()]
    blocks = [int(name) for name in block_names]
    with torch.no_grad():
        for start in range(0, len(order), 256):
            x = torch.stack([preprocess(Image.open(io.BytesIO(images[u])).convert("RGB")) for u in order[start : start + 256]])
            inter = visual.forward_intermediates(x, indices=blocks, output_fmt="NLC", intermediates_only=True)["image_intermediates"] if blocks else []
            for name, tokens in zip(block_names, inter):
                out[name].append(tokens.numpy())
            if "embed" in out:
                t = visual.conv1(x).flatten(2).transpose(1, 2) + visual.positional_embedding[1:]
                out["embed"].append(visual.ln_pre(t).numpy())
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


class Probe(torch.nn.Module):
    def __init__(self, words: int, width: int, tokens: int, answers: int, center: bool, dim: int = 128):
        super().__init__()
        self.center = center
        self.proj = torch.nn.Linear(width, dim)
        self.pos = torch.nn.Parameter(torch.randn(tokens, dim) * 0.1)
        self.query = torch.nn.Linear(words, dim)
        self.attn = torch.nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm = torch.nn.LayerNorm(dim)
        self.out = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, answers))

    def forward(self, question: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.read(question[:, None], tokens)[:, 0]

    def read(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, k, words) queries, (B, T, width) tokens -> (B, k, answers): each query's own read-out
        (``benchmarks/ipn_reader.py`` reads k ``<img-d>`` slots with it)."""
        regions = self.proj(center_tokens(tokens) if self.center else tokens) + self.pos[: tokens.shape[1]]
        q = self.query(queries)
        return self.out(self.norm(self.attn(q, regions, regions)[0] + q))


def probe(tokens: np.ndarray, index, train, val, steps: int, center: bool, every: int) -> tuple[list[float], dict[str, float]]:
    """Held-out accuracy every ``every`` steps, and the final one per question type."""
    torch.manual_seed(SEED)
    words = sorted({w for r in train + val for w in re.findall(r"\w+", r["question"].lower())})
    answers = sorted({r["answer"] for r in train + val})
    w_at, a_at = {w: i for i, w in enumerate(words)}, {a: i for i, a in enumerate(answers)}

    def encode(rows):
        q = torch.zeros(len(rows), len(words))
        for i, r in enumerate(rows):
            for w in re.findall(r"\w+", r["question"].lower()):
                q[i, w_at[w]] = 1
        return q, torch.tensor([index[r["uid"]] for r in rows]), torch.tensor([a_at[r["answer"]] for r in rows])

    feats = torch.from_numpy(tokens)
    (tq, ti, ty), (vq, vi, vy) = encode(train), encode(val)
    model = Probe(len(words), feats.shape[2], feats.shape[1], len(answers), center)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(SEED)
    accs: list[float] = []
    for step in range(1, steps + 1):
        b = torch.randint(0, len(train), (BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(tq[b], feats[ti[b]]), ty[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            with torch.no_grad():
                accs.append(float((model(vq, feats[vi]).argmax(1) == vy).float().mean()))
    with torch.no_grad():
        right = model(vq, feats[vi]).argmax(1) == vy
    types = [question_type(r["question"]) or "other" for r in val]
    return accs, {t: float(right[[i for i, u in enumerate(types) if u == t]].float().mean()) for t in sorted(set(types))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="a finished demo run's data.root")
    ap.add_argument("--model", default="lingcloud-small-vit", help="the CLIP that made the features (models/<model>.safetensors)")
    ap.add_argument("--layers", default="table,embed,0", help="comma-separated: table, embed, or a block index")
    ap.add_argument("--questions", default="What colour is the shape", help="comma-separated question starts to probe")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250, help="score the held-out questions every this many steps")
    ap.add_argument("--center", action="store_true", help="subtract each image's mean token first (model.rvii_center_tokens)")
    ap.add_argument("--standardize", action="store_true", help="each token dimension to zero mean, unit variance over the corpus first")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    index, _, table = load_features(args.root)
    starts = tuple(s.strip() for s in args.questions.split(","))
    train = [r for r in load_questions(args.root, "train") if r["uid"] in index and r["question"].startswith(starts)]
    val = [r for r in load_questions(args.root, "validation") if r["uid"] in index and r["question"].startswith(starts)]
    layers = args.layers.split(",")
    tokens = layer_tokens(args.root, index, [n for n in layers if n != "table"], args.model)
    tokens["table"] = table.astype(np.float32)
    if args.standardize:
        for name, t in tokens.items():
            flat = t.reshape(-1, t.shape[2])
            tokens[name] = (t - flat.mean(0)) / (flat.std(0) + 1e-6)
    print(f"{len(train)} training, {len(val)} held-out questions starting {starts}; centred: {args.center}; "
          f"standardised: {args.standardize}", flush=True)
    results, by_type = {}, {}
    for name in layers:
        results[name], by_type[name] = probe(tokens[name], index, train, val, args.steps, args.center, args.every)
        print(f"  {name}: {' '.join(f'{a:.3f}' for a in results[name])}", flush=True)
    base = results.get("table", [None])[-1]
    steps = range(args.every, args.steps + 1, args.every)
    print("\n| tokens | " + " | ".join(f"step {s}" for s in steps) + " | final / table's |")
    print("| --- |" + " --- |" * (len(steps) + 1))
    for name, accs in results.items():
        ratio = f"{accs[-1] / base:.2f}" if base else "-"
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {ratio} |")
    kinds = sorted({t for d in by_type.values() for t in d})
    print(f"\nat step {args.steps}, per question type:\n| tokens | " + " | ".join(kinds) + " |\n| --- |" + " --- |" * len(kinds))
    for name, d in by_type.items():
        print(f"| {name} | " + " | ".join(f"{d[t]:.3f}" for t in kinds) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
