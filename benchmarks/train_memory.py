"""Memory of a training worker with a large frozen LLM, on the CPU: what loading costs, and what
activation checkpointing through the LLM saves in a step.

    python benchmarks/train_memory.py [--size 1b] [--layers N] [--seq 512] [--micro-batch 4]

The model is ``benchmarks/train_gpu.py``'s: a random LLaMA of TinyLlama's shape (1.1B, 22 layers,
hidden 2048; ``--layers`` keeps the width with fewer layers), saved as bf16 safetensors and loaded
back with ``from_pretrained`` in bf16, as a worker loads it (``train.precision: bf16``), and a
ViT-L-14-sized CLIP text tower. Each measurement runs in a process of its own (after one that only
builds and saves the model), which reads its resident memory (``/proc/self/statm``, sampled every
2 ms during the step):

* *load*: resident memory added by building the IPN (LLM, tower) over the bytes of its weights
  (target <= 1.2: one copy in the training dtype, not an fp32 copy cast later);
* *step*: the peak resident memory of one training step (forward and backward under bf16 autocast,
  a micro-batch of ``--micro-batch`` samples of about ``--seq`` tokens) above the memory before it:
  the activation part. Once with the LLM's activations kept (the default), once recomputed
  (``train.activation_checkpointing``); printed with their ratio (target <= 0.5).

``--size tiny`` runs in seconds (``tests/benchmarks/test_train_memory.py``), so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """The highest resident memory seen while the block runs (a thread samples it every 2 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())


def _train_gpu():
    sys.path.insert(0, str(HERE))
    import train_gpu

    return train_gpu


def size_of(args) -> dict:
    """train_gpu.py's size, with ``--layers`` and words enough for about ``--seq`` tokens a sample."""
    size = dict(_train_gpu().SIZES[args.size])
    size["llm"] = dict(size["llm"], **({"num_hidden_layers": args.layers} if args.layers else {}))
    if args.seq:
        size.update(prompt_words=args.seq * 2 // 5, answer_words=args.seq // 5)
    return size


def measure(args) -> dict:
    """One child's figures (``--child keep|recompute|build``)."""
    import torch

    tg = _train_gpu()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    size = size_of(args)
    tok = tg.build_tokenizer(size)
    import transformers.models.llama.modeling_llama  # noqa: F401  (what the load imports, before the count)
    from transformers import AutoModelForCausalLM  # noqa: F401

    before_load = rss()
    ipn = tg.build_ipn(size, Path(args.work), "cpu", torch.bfloat16, tok)
    with torch.no_grad():  # page in every weight (safetensors maps the file): a step reads them all anyway
        for p in ipn.parameters():
            p.sum()
    after_load = rss()
    weights = sum(p.numel() * p.element_size() for p in ipn.parameters())
    if args.child == "build":
        return {}
    ipn.train()
    if args.child == "recompute":
        ipn.recompute_activations()
    batch, tokens = tg.make_batch(ipn, size, args.micro_batch, seed=0)
    before_step = rss()
    with PeakRSS() as peak:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ipn(batch).loss
        loss.backward()
    return {"variant": args.child, "weights_bytes": weights, "load_bytes": after_load - before_load,
            "step_bytes": peak.peak - before_step, "tokens_per_sample": tokens / args.micro_batch,
            "llm_params": sum(p.numel() for p in ipn.llm.parameters()), "loss": float(loss.detach())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("1b", "tiny"), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="the size's width with this many layers")
    ap.add_argument("--seq", type=int, default=512, help="about this many tokens a sample (0: the size's own)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/lingcloud-train-memory"))
    ap.add_argument("--child", choices=("build", "keep", "recompute"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return 0
    results = {}
    for child in ("build", "keep", "recompute"):  # each in a fresh process: RSS is not given back within one
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", child],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout[-3000:] + out.stderr[-3000:], file=sys.stderr)
            return 1
        results[child] = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
    keep, again = results["keep"], results["recompute"]
    gib = 2**30
    load_ratio = keep["load_bytes"] / keep["weights_bytes"]
    step_ratio = again["step_bytes"] / keep["step_bytes"]
    print(f"[train_memory] LLM {keep['llm_params'] / 1e9:.3f}B params (bf16), micro-batch {args.micro_batch} x "
          f"{keep['tokens_per_sample']:.0f} tokens")
    print(f"load: {keep['load_bytes'] / gib:.2f} GiB resident for {keep['weights_bytes'] / gib:.2f} GiB of weights: "
          f"ratio {load_ratio:.2f} (target <= 1.2)")
    print(f"step: activations kept {keep['step_bytes'] / gib:.2f} GiB, recomputed {again['step_bytes'] / gib:.2f} GiB: "
          f"ratio {step_ratio:.2f} (target <= 0.5); loss {keep['loss']:.4f} / {again['loss']:.4f}")
    print("RESULT " + json.dumps({"load_ratio": load_ratio, "step_ratio": step_ratio, "keep": keep, "recompute": again}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
