"""Can a demo-sized frozen LLM compare? Held-out accuracy of the demo LLM's recipe at other sizes.

    .venv/bin/python benchmarks/demo_llm_formats.py [--steps 1000] [--hidden 64] [--layers 2] [--lr 3e-3]
        [--formats plain,yes_no] [--items 60]

Issue 22 asks the demo for MME >= 0.85 (yes/no) and MMBench >= 0.70 (options). The IPN answers
through the frozen LLM, so the LLM itself must turn "Is the answer red? Please answer yes or no."
plus what the image shows into "Yes" or "No". This builds the demo LLM exactly as
``lmeye.model.demo.build_demo_llm`` does (same conversations, tokenizer and training loop), at
the size, learning rate and step count given, and asks it held-out questions (corpus seed 99,
never in its text) with three contexts after the prompt:

* ``none``: the prompt alone: the answer prior, the baseline each other figure is read against;
* ``fact``: the caption phrase that answers it ("a blue circle at the top left"), what the IPN's
  ``<img-d>`` slots stand in for;
* ``answer``: the bare answer ("blue").

For plain questions ``fact`` far above ``none`` means the LLM reads the image's slot; for yes/no
it means the LLM compares the candidate with what it read. Prints one JSON line with the
accuracies and each context's ratio to ``none``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.demo.corpus import generate_items, qa_pairs  # noqa: E402
from lmeye.model import demo  # noqa: E402
from pipelines.instruct.formats import AnswerPool, Formatter  # noqa: E402

CONTEXTS = ("none", "fact", "answer")


def build(steps: int, hidden: int, layers: int, lr: float, formats: tuple[str, ...]):
    """The demo LLM's recipe at another size: (model, tokenizer, seconds of training and text)."""
    spec = json.loads(demo.config_json().read_text()) | {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    start = time.perf_counter()
    model, tok = demo.train_demo_llm(spec, steps, formats, lr)
    return model, tok, time.perf_counter() - start


def score(model, tok, items: int) -> dict[str, float]:
    """Exact match per (format, context) on held-out scenes."""
    scenes = generate_items(items, 99, max_objects=1)
    pool = AnswerPool(((qa["question"], qa["answer"]) for s in scenes for qa in qa_pairs(s)), words=3)
    out = {}
    for name in ("plain", "yes_no", "multiple_choice"):
        formatter = Formatter({name: 1.0}, pool, 5, f"bench-{name}")
        for context in CONTEXTS:
            right = total = 0
            for i, scene in enumerate(scenes):
                for j, qa in enumerate(qa_pairs(scene, with_facts=True)):
                    _, ((_, prompt), (_, reply)) = formatter.apply(qa["question"], qa["answer"], "vqa", f"{i}-{j}", ("user", "assistant"))
                    after = {"none": "", "fact": qa["fact"], "answer": qa["answer"]}[context]
                    text = tok.apply_chat_template([{"role": "user", "content": f"{prompt} {after}".strip()}], tokenize=False, add_generation_prompt=True)
                    x = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
                    with torch.no_grad():
                        y = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
                    right += tok.decode(y[0, x.shape[1]:], skip_special_tokens=True).strip().lower() == reply.lower()
                    total += 1
            out[f"{name}/{context}"] = round(right / total, 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=demo.LR)
    p.add_argument("--formats", default="plain,yes_no")
    p.add_argument("--items", type=int, default=60, help="held-out scenes (about 5 questions each)")
    a = p.parse_args()
    model, tok, seconds = build(a.steps, a.hidden, a.layers, a.lr, tuple(a.formats.split(",")))
    model.eval()
    acc = score(model, tok, a.items)
    ratios = {k: round(v / max(acc[k.split("/")[0] + "/none"], 1e-3), 2) for k, v in acc.items() if not k.endswith("/none")}
    print(json.dumps({"steps": a.steps, "hidden": a.hidden, "layers": a.layers, "lr": a.lr, "formats": a.formats,
                      "train_s": round(seconds, 1), "accuracy": acc, "vs_none": ratios}))


if __name__ == "__main__":
    main()
