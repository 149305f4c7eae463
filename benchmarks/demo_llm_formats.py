"""Can a demo-sized frozen LLM compare? Held-out accuracy of the demo LLM's recipe at other sizes.

    .venv/bin/python benchmarks/demo_llm_formats.py [--family llama|t5] [--steps 1000] [--hidden 64] [--layers 2]
        [--lr LR] [--formats plain,yes_no] [--items 60]

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
it means the LLM compares the candidate with what it read. ``--family t5`` builds the demo T5
(``demo.llm_family: t5``; ``--hidden``/``--layers`` size only the LLaMA) by its own recipe. Prints one
JSON line with the accuracies, each context's ratio to ``none`` and, per question type, the accuracy
with the fact (``by_type``: a one-shape scene's count question has no other answer to ask yes/no
about, so it is asked in the short form and kept out of the yes/no and multiple-choice figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.demo.corpus import generate_items, qa_pairs  # noqa: E402
from lmeye.demo.learning_check import question_type  # noqa: E402
from lmeye.model import demo  # noqa: E402
from pipelines.instruct.formats import AnswerPool, Formatter  # noqa: E402

CONTEXTS = ("none", "fact", "answer")


def build(family: str, steps: int, hidden: int, layers: int, lr: Optional[float], formats: tuple[str, ...]):
    """The demo LLM's recipe (at another size for the LLaMA): (model, tokenizer, seconds of training and text)."""
    spec = json.loads(demo.config_json(family).read_text())
    if family == "llama":
        spec |= {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    start = time.perf_counter()
    model, tok = demo.train_demo_llm(spec, steps, formats, lr)
    return model, tok, time.perf_counter() - start


def reply(model, tok, prompt: str) -> str:
    """The greedy reply to ``prompt`` as the only user turn (an encoder-decoder returns only the reply)."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    x = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        y = model.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(y[0] if model.config.is_encoder_decoder else y[0, x.shape[1]:], skip_special_tokens=True).strip()


def score(model, tok, items: int) -> dict[str, Any]:
    """Exact match per (format, context) on held-out scenes, and per question type with the fact."""
    scenes = generate_items(items, 99, max_objects=1)
    pool = AnswerPool(((qa["question"], qa["answer"]) for s in scenes for qa in qa_pairs(s)), words=3)
    out: dict[str, Any] = {"by_type": {}}
    for name in ("plain", "yes_no", "multiple_choice"):
        formatter = Formatter({name: 1.0}, pool, 5, f"bench-{name}")
        for context in CONTEXTS:
            right, total = Counter(), Counter()
            for i, scene in enumerate(scenes):
                for j, qa in enumerate(qa_pairs(scene, with_facts=True)):
                    task, ((_, prompt), (_, want)) = formatter.apply(qa["question"], qa["answer"], "vqa", f"{i}-{j}", ("user", "assistant"))
                    if name != "plain" and task == "vqa":
                        continue  # no other answer to contrast: asked in the short form, not this one
                    after = {"none": "", "fact": qa["fact"], "answer": qa["answer"]}[context]
                    ok = reply(model, tok, f"{prompt} {after}".strip()).lower() == want.lower()
                    for key in ("all", question_type(qa["question"])):
                        right[key] += ok
                        total[key] += 1
            out[f"{name}/{context}"] = round(right["all"] / total["all"], 3)
            if context == "fact":
                out["by_type"][name] = {k: round(right[k] / total[k], 3) for k in total if k != "all"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llama", choices=sorted(demo.NAMES))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="default: the family's recipe (LLaMA 3e-3; T5 1e-3 after 50 warm-up steps)")
    p.add_argument("--formats", default="plain,yes_no")
    p.add_argument("--items", type=int, default=60, help="held-out scenes (about 5 questions each)")
    a = p.parse_args()
    model, tok, seconds = build(a.family, a.steps, a.hidden, a.layers, a.lr, tuple(a.formats.split(",")))
    model.eval()
    acc = score(model, tok, a.items)
    ratios = {k: round(v / max(acc[k.split("/")[0] + "/none"], 1e-3), 2) for k, v in acc.items() if "/" in k and not k.endswith("/none")}
    print(json.dumps({"family": a.family, "steps": a.steps, "hidden": a.hidden, "layers": a.layers, "lr": a.lr, "formats": a.formats,
                      "train_s": round(seconds, 1), "accuracy": acc, "vs_none": ratios}))


if __name__ == "__main__":
    main()
