"""Can the IPN answer the benchmarks' yes/no and multiple-choice forms? Stage 2 in plain PyTorch, no Ray.

    python benchmarks/ipn_formats.py --root DEMO_ROOT --llm LLM_DIR [--request last prefix] [--rvii transformer]
        [--steps 768] [--formats plain=2,yes_no=1,multiple_choice=1] [--val 300] [--oracle]

``DEMO_ROOT`` is a finished ``lmeye demo`` run (its ``features`` and ``instructions`` tables); ``LLM_DIR``
a demo LLM that knows the forms (``lmeye.model.demo.build_demo_llm(dir, 1000, FORMATS)``). For each
``--request`` (``model.request``: the ``<img-q>`` state alone, or the whole user turn), a fresh IPN is
trained as the demo's stage 2 trains it (the corpus's questions, batch 64, AdamW 1e-3, 20 warm-up steps,
cosine; request, RVII, transmission and the visual mapping; no stage 1) on the training split's
questions, each asked in one of ``--formats`` by the instruct stage's own ``Formatter``. Then, on held-out
questions (the validation split, up to ``--val``), greedy answers:

* plain: exact match, per question type;
* yes/no: each question with its own answer as the candidate ("Yes") and with another answer of its type
  ("No"): accuracy over both, and MME's acc+ (both right);
* multiple choice: four options (the answer and three of its type's others), asked in all four rotations
  as MMBench's CircularEval does: accuracy of single passes, and CircularEval (all four right).

``--oracle`` first measures the LLM side alone: the yes/no set with every ``<img-d>`` slot holding the
reply's own token embedding (what an IPN that had worked the reply out could get from this LLM).

The model config is ``configs/demo.yaml``'s ``model:`` with ``--rvii`` and each ``--request``; everything
is seeded, so two runs of one variant give the same figures. Prints one table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmeye.config.model import ModelConfig  # noqa: E402
from lmeye.demo.clip_heads import random_heads_path  # noqa: E402
from lmeye.demo.learning_check import question_type  # noqa: E402
from lmeye.eval.mmbench import LETTERS, build_prompt  # noqa: E402
from lmeye.model.build import build_ipn  # noqa: E402
from lmeye.train.ds_config import lr_factor  # noqa: E402
from lmeye.train.evaluate import normalise  # noqa: E402
from lmeye.model.text import IMG_D  # noqa: E402
from pipelines.instruct.formats import AnswerPool, Formatter, yes_no_question  # noqa: E402

BATCH, LR, WARMUP, TYPE_WORDS, SEED = 64, 1e-3, 20, 3, 0


def load_features(root: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """uid -> row, pooled embeddings (N, D) and patch tokens (N, T, W), float16, from every shard."""
    shards = sorted((root / "features").glob("*.parquet"))
    meta = pq.read_schema(shards[0]).metadata
    t, w = (int(x) for x in meta[b"lingcloud.patch_tokens_shape"].decode().split(","))
    uids, emb, patches = [], [], []
    for shard in shards:
        table = pq.read_table(shard, columns=["uid", "status", "embedding", "patch_tokens"])
        ok = np.array([s == "success" for s in table["status"].to_pylist()])
        uids += [u for u, k in zip(table["uid"].to_pylist(), ok) if k]
        emb.append(np.stack(table["embedding"].to_numpy(zero_copy_only=False))[ok])
        patches.append(np.stack(table["patch_tokens"].to_numpy(zero_copy_only=False))[ok].reshape(-1, t, w))
    return {u: i for i, u in enumerate(uids)}, np.concatenate(emb), np.concatenate(patches)


def load_questions(root: Path, split: str) -> list[dict]:
    """The corpus's question/answer rows (task vqa) of ``split``."""
    rows = []
    for shard in sorted((root / "instructions").glob(f"{split}-*.parquet")):
        for r in pq.read_table(shard, columns=["sample_id", "uid", "task", "conversation"]).to_pylist():
            if r["task"] == "vqa" and len(r["conversation"]) == 2:
                rows.append({"id": r["sample_id"], "uid": r["uid"], "question": r["conversation"][0]["content"],
                             "answer": r["conversation"][1]["content"]})
    return rows


def parse_formats(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in (part.split("=") for part in text.split(","))}


def model_config(root: Path, llm: str, rvii: str, request: str, overrides: tuple[str, ...] = ()) -> ModelConfig:
    model = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["model"]
    model.update(llm=llm, rvii=rvii, request=request)
    model.update({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    if rvii == "clip_text":  # the CLIP that made the features, its heads as initialised where demo.clip_heads aligned them (as ensure_demo_llm does)
        clip = root / "models" / f"{model['clip_model']}.safetensors"
        random_heads = Path(random_heads_path(str(clip)))
        model["clip_pretrained"] = str(random_heads if random_heads.exists() else clip)
    return ModelConfig.model_validate(model)


def batch_of(ipn, encs: list[dict], rows: list[dict], index, emb, patches) -> dict:
    at = [index[r["uid"]] for r in rows]
    return ipn.collate(encs, emb[at].astype(np.float32), patches[at].astype(np.float32))


def train(ipn, rows: list[dict], steps: int, index, emb, patches, log_every: int = 50, lr: float = LR,
          schedule: str = "cosine", extra_loss: Optional[Callable[[dict], torch.Tensor]] = None) -> list[float]:
    """Stage 2 on ``rows`` (each a {'conversation', 'uid'}): shuffled epochs of BATCH, AdamW, warm-up + cosine.
    ``extra_loss(batch)``, called after the IPN's forward on ``batch``, is added to its loss
    (``benchmarks/ipn_reader.py``'s answer loss); the losses returned are the IPN's own."""
    encs = [ipn.encode(r["conversation"], has_image=True) for r in rows]
    keep = [i for i, e in enumerate(encs) if e is not None]
    ipn.set_trainable("instruct", train_visual_mapping=True)
    opt = torch.optim.AdamW(ipn.trainable_parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(schedule, WARMUP, steps))
    gen = np.random.default_rng(SEED)
    order: list[int] = []
    losses = []
    ipn.train()
    start = time.time()
    for step in range(steps):
        if len(order) < BATCH:
            order += list(gen.permutation(keep))
        pick, order = order[:BATCH], order[BATCH:]
        batch = batch_of(ipn, [encs[i] for i in pick], [rows[i] for i in pick], index, emb, patches)
        loss = ipn(batch).loss
        opt.zero_grad()
        (loss if extra_loss is None else loss + extra_loss(batch)).backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            print(f"  step {step + 1}: loss {np.mean(losses[-log_every:]):.3f} ({time.time() - start:.0f} s)", flush=True)
    ipn.eval()
    return losses


@torch.no_grad()
def answer(ipn, prompts: list[tuple[str, str]], index, emb, patches) -> list[str]:
    """Greedy answers to (uid, question) pairs."""
    out = []
    for s in range(0, len(prompts), BATCH):
        part = prompts[s : s + BATCH]
        encs = [ipn.encode([{"role": "user", "content": q}], has_image=True, for_generation=True) for _, q in part]
        out += ipn.generate(batch_of(ipn, encs, [{"uid": u} for u, _ in part], index, emb, patches), max_new_tokens=6)
    return out


FORMS = (("colour of the shape at", re.compile(r"^what colou?r is the shape (at|in) ")), ("shape at", re.compile(r"^what shape is ")),
         ("where is the", re.compile(r"^where is ")), ("colour of the", re.compile(r"^what colou?r is the (?!background)")))


def question_form(question: str) -> str:
    """The demo corpus's question form (its one-hop and two-hop kinds), else its answer type."""
    q = question.strip().lower()
    return next((name for name, pattern in FORMS if pattern.search(q)), question_type(question) or "other")


def yes_no_pairs(val: list[dict], pool: AnswerPool, rng: random.Random) -> tuple[list[dict], list[tuple[str, str]], list[str]]:
    """The held-out yes/no set: each question with its own answer ("yes") and another of its type ("no")."""
    rows = [r for r in val if pool.others(r["question"], r["answer"])]
    prompts, truth = [], []
    for r in rows:
        for cand, reply in ((r["answer"], "yes"), (rng.choice(pool.others(r["question"], r["answer"])), "no")):
            prompts.append((r["uid"], yes_no_question(r["question"], cand)))
            truth.append(reply)
    return rows, prompts, truth


@torch.no_grad()
def slot_oracle(ipn, val: list[dict], pool: AnswerPool, index, emb, patches) -> float:
    """Yes/no accuracy of the frozen LLM when every <img-d> slot holds the embedding of the reply's own
    token (" Yes" / " No", as the demo LLM saw it after the prompt): what an IPN that had worked the
    reply out could get from this LLM. The IPN's other parts (the <img> and <img-q> slots) are as given."""
    _, prompts, truth = yes_no_pairs(val, pool, random.Random(SEED))
    table = ipn.llm.get_input_embeddings()
    hits = []
    for s in range(0, len(prompts), BATCH):
        part, want = prompts[s : s + BATCH], truth[s : s + BATCH]
        encs = [ipn.encode([{"role": "user", "content": q}], has_image=True, for_generation=True) for _, q in part]
        batch = batch_of(ipn, encs, [{"uid": u} for u, _ in part], index, emb, patches)  # the IPN runs on the CPU here
        reply = torch.tensor([ipn.tokenizer(" " + w.capitalize(), add_special_tokens=False)["input_ids"][0] for w in want])
        suffix = torch.where(batch["suffix_ids"] == IMG_D, reply[:, None], batch["suffix_ids"].clamp(min=0))
        embeds = torch.cat([ipn.prefix_embeds(batch), table(suffix)], dim=1)
        mask = torch.cat([batch["prefix_mask"], batch["suffix_mask"]], dim=1)
        out = ipn.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               pad_token_id=ipn.tokenizer.pad_token_id, eos_token_id=ipn.codec.stop_ids(ipn.llm.generation_config))
        hits += [normalise(a) == w for a, w in zip(ipn.tokenizer.batch_decode(out, skip_special_tokens=True), want)]
    return float(np.mean(hits))


def evaluate_plain(ipn, val: list[dict], index, emb, patches) -> dict:
    """Held-out exact match of the plain questions: per type ("plain") and per question form ("plain_by_form")."""
    got = answer(ipn, [(r["uid"], r["question"]) for r in val], index, emb, patches)
    # by type, and by the question's form: with several shapes "What colour is the circle?" must find the circle
    # first, "What colour is the shape at the top left?" reads one region
    hit, n, form_hit, form_n = Counter(), Counter(), Counter(), Counter()
    for r, a in zip(val, got):
        ok = normalise(a) == normalise(r["answer"])
        for t in ("all", question_type(r["question"])):
            hit[t] += ok
            n[t] += 1
        form = question_form(r["question"])
        form_hit[form] += ok
        form_n[form] += 1
    return {"plain": {t: hit[t] / n[t] for t in n}, "plain_by_form": {f: form_hit[f] / form_n[f] for f in sorted(form_n)}}


def evaluate(ipn, val: list[dict], pool: AnswerPool, index, emb, patches) -> dict:
    rng = random.Random(SEED)
    res = evaluate_plain(ipn, val, index, emb, patches)
    # yes/no: each question with its own answer and with another of its type
    yn, prompts, truth = yes_no_pairs(val, pool, rng)
    got = [normalise(a) for a in answer(ipn, prompts, index, emb, patches)]
    right = [g == t for g, t in zip(got, truth)]
    by_type = defaultdict(list)  # colour is the easy case: the plain colour question is answered almost always
    for r, a, b in zip(yn, right[::2], right[1::2]):
        by_type[question_type(r["question"])] += [a, b]
    res["yes_no"] = {"acc": float(np.mean(right)), "acc_plus": float(np.mean([a and b for a, b in zip(right[::2], right[1::2])])),
                     "unparsed": sum(g not in ("yes", "no") for g in got), "said_yes": float(np.mean([g == "yes" for g in got])),
                     "by_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())}}
    # multiple choice, four rotations
    mc = [r for r in val if len(pool.others(r["question"], r["answer"])) >= 3]
    prompts, truth = [], []
    for r in mc:
        options = [r["answer"]] + rng.sample(pool.others(r["question"], r["answer"]), 3)
        rng.shuffle(options)
        for shift in range(4):
            rot = options[shift:] + options[:shift]
            prompts.append((r["uid"], build_prompt(r["question"], None, tuple(zip(LETTERS, rot)))))
            truth.append(LETTERS[rot.index(r["answer"])].lower())
    got = [normalise(a) for a in answer(ipn, prompts, index, emb, patches)]
    right = [g == t for g, t in zip(got, truth)]
    res["multiple_choice"] = {"acc": float(np.mean(right)), "circular": float(np.mean([all(right[i : i + 4]) for i in range(0, len(right), 4)])),
                              "unparsed": sum(g not in [x.lower() for x in LETTERS[:4]] for g in got)}
    res["counts"] = {"plain": len(val), "yes_no": len(yn), "multiple_choice": len(mc)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path, help="a finished demo run's data.root")
    ap.add_argument("--llm", required=True, help="a demo LLM directory trained with the formats")
    ap.add_argument("--request", nargs="*", default=["last", "prefix"], choices=["last", "prefix"], help="model.request variants to train (none: --oracle only)")
    ap.add_argument("--rvii", default="transformer", choices=["clip_text", "transformer"])
    ap.add_argument("--steps", type=int, default=768, help="stage-2 steps (the demo's: 768)")
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate (the demo's train.lr)")
    ap.add_argument("--schedule", default="cosine", choices=["constant", "linear", "cosine"], help="after warm-up (the demo's train.schedule)")
    ap.add_argument("--formats", default="plain=2,yes_no=1,multiple_choice=1", help="instruct.sources[].formats weights")
    ap.add_argument("--val", type=int, default=300, help="held-out questions (each asked plain, 2x yes/no, 4x multiple choice)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine 2 threads spin against other work)")
    ap.add_argument("--oracle", action="store_true", help="first, the LLM's yes/no accuracy with the reply's token in every <img-d> slot")
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE", help="model: keys over configs/demo.yaml's (e.g. rvii_image_position=true)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    index, emb, patches = load_features(args.root)
    train_rows = [r for r in load_questions(args.root, "train") if r["uid"] in index]
    val = [r for r in load_questions(args.root, "validation") if r["uid"] in index]
    val = random.Random(SEED).sample(val, min(args.val, len(val)))
    pool = AnswerPool(((r["question"], r["answer"]) for r in train_rows), words=TYPE_WORDS)
    formatter = Formatter(parse_formats(args.formats), pool, SEED, "demo_vqa")
    rows, tasks = [], Counter()
    for r in train_rows:
        task, turns = formatter.apply(r["question"], r["answer"], "vqa", r["id"], ("user", "assistant"))
        tasks[task] += 1
        rows.append({"uid": r["uid"], "conversation": [{"role": role, "content": text} for role, text in turns]})
    print(f"{len(rows)} training rows {dict(tasks)}; {len(val)} held-out questions", flush=True)

    results = {}
    if args.oracle:
        ipn = build_ipn(model_config(args.root, args.llm, args.rvii, "last", args.model), emb.shape[1], patches.shape[1:]).eval()
        results["oracle_yes_no"] = slot_oracle(ipn, val, pool, index, emb, patches)
        print(f"yes/no with the reply's token in every <img-d> slot: {results['oracle_yes_no']:.3f}", flush=True)
    for request in args.request:
        cfg = model_config(args.root, args.llm, args.rvii, request, args.model)
        ipn = build_ipn(cfg, emb.shape[1], patches.shape[1:])
        print(f"request: {request}, rvii: {args.rvii}", flush=True)
        t0 = time.time()
        losses = train(ipn, rows, args.steps, index, emb, patches, lr=args.lr, schedule=args.schedule)
        seconds = time.time() - t0
        results[request] = evaluate(ipn, val, pool, index, emb, patches) | {"train_s": seconds, "final_loss": float(np.mean(losses[-50:]))}
        print(json.dumps(results[request]), flush=True)

    if args.request:
        print_table(args, results)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


def print_table(args, results: dict) -> None:
    print(f"\n{args.steps} steps, rvii {args.rvii}, formats {args.formats}, model {' '.join(args.model) or 'as configs/demo.yaml'}")
    print("| request | plain exact match (worst type) | yes/no acc (acc+) | multiple choice acc | CircularEval | train s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for request, r in results.items():
        if request == "oracle_yes_no":
            continue
        worst = min((v, t) for t, v in r["plain"].items() if t != "all")
        print(f"| {request} | {r['plain']['all']:.3f} ({worst[1]} {worst[0]:.2f}) | {r['yes_no']['acc']:.3f} ({r['yes_no']['acc_plus']:.3f}) | "
              f"{r['multiple_choice']['acc']:.3f} | {r['multiple_choice']['circular']:.3f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
