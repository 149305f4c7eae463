"""Stage-2 (instruct) training speed of the IPN on one GPU, offline, with torch and transformers alone.

    bash benchmarks/train_gpu.sh [--size 1b|tiny] [--steps 30] [--micro-batch 16] [--peak-tflops 989]

What a bare GPU machine can run (no Ray, DeepSpeed, open_clip or pydantic there, nothing downloaded):

* the LLM: a random ~1.1B LLaMA (TinyLlama's shape: 22 layers, hidden 2048, vocabulary 32,000) built
  from its config, saved with ``save_pretrained`` and loaded back with ``from_pretrained`` like real
  weights, frozen, in bf16 on a GPU;
* RVII's CLIP text tower: ViT-L-14's text transformer by size (12 layers, width 768, 12 heads,
  context 77, projection 768), random, built in torch (open_clip's ``Transformer`` computes the same
  matmuls), frozen, wrapped by the IPN's own ``ClipTextTower``;
* features shaped like ViT-L-14's (768-d pooled, 16 x 16 patch tokens of width 1024), random;
* the tokenizer: a byte-level BPE with the chat template (``lmeye.model.demo.build_tokenizer``),
  trained in a second on this file's own text; no demo LLM is trained.

It times the IPN's ``forward`` + ``backward`` + an AdamW step on the trainable parts (request, RVII,
transmission, visual mapping), which is what a training step is minus DeepSpeed's bookkeeping, and
prints samples/s, tokens/s, model FLOPs utilisation and peak memory:

* tokens/s: every token the LLM processes (prefix, ``<img>``/``<img-q>``/``<img-d>`` slots, suffix),
  padding excluded;
* MFU = FLOPs per step / step time / peak, with FLOPs per step =
  4 N_llm T + 4 h V (S + B) + 4 N_clip R B + 6 N_ipn B, where N_llm is the LLM's parameters less its
  input embedding and output head, T the tokens it processes, h V the output head (logits over the S
  suffix tokens and one prefix token a sample), N_clip the text tower's parameters, R its sequence
  (BOS, image regions, k requests, EOS), N_ipn the trainable parameters and B the samples. The frozen
  parts count 2 (forward) + 2 (gradients of activations; their weights get none); attention scores
  are left out, so MFU is a lower bound.

``--size tiny`` runs the same code on the CPU in seconds: ``tests/benchmarks/test_train_gpu.py`` runs
it there with the modules a bare machine lacks made unimportable, so this script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

# name -> (LLaMA config, CLIP text tower, features (dim, patch tokens, width), words a prompt, words an answer)
SIZES = {
    "1b": dict(
        llm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000),
        clip=dict(width=768, heads=12, layers=12, context_length=77, embed_dim=768, vocab_size=49408),
        features=(768, (256, 1024)), prompt_words=256, answer_words=128,
    ),
    "tiny": dict(
        llm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=600),
        clip=dict(width=32, heads=4, layers=2, context_length=77, embed_dim=32, vocab_size=64),
        features=(32, (16, 64)), prompt_words=12, answer_words=6,
    ),
}
# the IPN's settings (lmeye.config.model.ModelConfig's keys, LMEye's values; a plain namespace,
# since the bare machine has no pydantic; tests check every key is one of ModelConfig's)
IPN_SETTINGS = dict(rvii="clip_text", num_img=1, num_img_d=5, rvii_image_tokens=32, rvii_center_tokens=False,
                    transmission="shared", rvii_width=256, rvii_layers=2, rvii_heads=4, seed=0, max_length=1024,
                    system_prompt=None, chat_template=None, request="last", rvii_image_position=False)


class Blocks(nn.Module):
    """Pre-norm residual blocks called as open_clip's ``Transformer`` is: ``blocks(x, attn_mask=mask)``."""

    def __init__(self, width: int, heads: int, layers: int):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, mask=attn_mask)


class TextTransformer(nn.Module):
    """A CLIP text tower by size: what ``lmeye.model.rvii.ClipTextTower`` takes from an open_clip model
    (pre-norm residual blocks called as ``transformer(x, attn_mask=mask)``, final norm, projection)."""

    def __init__(self, width: int, heads: int, layers: int, context_length: int, embed_dim: int, vocab_size: int):
        super().__init__()
        self.transformer = Blocks(width, heads, layers)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)


def corpus(seed: int = 0) -> list[str]:
    """Sentences to train the benchmark's tokenizer on and to draw prompts and answers from."""
    words = __doc__.split() + [f"w{i}" for i in range(300)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(24)) for _ in range(400)]


def build_llm(size: dict, tokenizer, work: Path, device: str, dtype: torch.dtype):
    """A random LLaMA of ``size`` saved under ``work`` (once) and loaded back like real weights, frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = work / "llm"
    cfg = LlamaConfig(**size["llm"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    saved = path / "config.json"
    if not saved.is_file() or json.loads(saved.read_text()).get("hidden_size") != cfg.hidden_size:
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it will run: a CPU init of 1B weights takes minutes
            model = LlamaForCausalLM(cfg).to(dtype)
        model.save_pretrained(path)
        del model
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def build_tokenizer(size: dict):
    """The byte-level BPE with the chat template, trained on ``corpus()`` (a second)."""
    from lmeye.model.demo import build_tokenizer as train_bpe

    return train_bpe(corpus(), vocab_size=min(size["llm"]["vocab_size"], 2000))


def build_ipn(size: dict, work: Path, device: str, dtype: torch.dtype, tok=None):
    """The IPN of ``size`` (``tok``: its tokenizer, default ``build_tokenizer(size)``)."""
    from lmeye.model.ipn import IPN
    from lmeye.model.rvii import ClipTextTower

    tok = tok or build_tokenizer(size)
    llm = build_llm(size, tok, work, device, dtype)
    torch.manual_seed(0)
    text = TextTransformer(**size["clip"])
    tower = ClipTextTower(text, 0, 1).to(dtype)
    dim, patch = size["features"]
    ipn = IPN(SimpleNamespace(**IPN_SETTINGS), dim, patch, llm, tok, tower).to(device)
    ipn.set_trainable("instruct")
    return ipn


def make_batch(ipn, size: dict, micro: int, seed: int) -> tuple[dict, int]:
    """A micro-batch of one-image question/answer samples of the size's length, with random features;
    and the tokens the LLM processes for it."""
    rng = random.Random(seed)
    words = " ".join(corpus(seed)).split()
    encs = []
    while len(encs) < micro:
        q = " ".join(rng.choice(words) for _ in range(size["prompt_words"]))
        a = " ".join(rng.choice(words) for _ in range(size["answer_words"]))
        enc = ipn.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}], True)
        if enc is not None:
            encs.append(enc)
    dim, (t, w) = size["features"]
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(micro, dim, generator=g), dim=-1).numpy()
    patches = torch.randn(micro, t, w, generator=g).numpy()
    batch = ipn.collate(encs, emb, patches)
    return batch, int(batch["prefix_mask"].sum() + batch["suffix_mask"].sum())


def step_flops(ipn, batch: dict, tokens: int) -> float:
    """FLOPs of one training step by the module docstring's formula."""
    llm = ipn.llm
    head = llm.get_output_embeddings().weight
    embed = llm.get_input_embeddings().weight
    n_llm = sum(p.numel() for p in llm.parameters()) - embed.numel() - (0 if head is embed else head.numel())
    b = len(batch["prefix_ids"])
    suffix = int(batch["suffix_mask"].sum())
    tower = ipn.rvii.tower
    n_clip = sum(p.numel() for n, p in tower.named_parameters() if n != "bos_eos")
    rvii_len = 2 + ipn.rvii.max_image_tokens + ipn.cfg.num_img_d
    n_ipn = sum(p.numel() for p in ipn.trainable_parameters())
    return 4 * n_llm * tokens + 4 * head.numel() * (suffix + b) + 4 * n_clip * rvii_len * b + 6 * n_ipn * b


def peak_memory(device: str) -> tuple[float, str]:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30, "GPU memory (max allocated)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process memory (peak RSS)"


def run(size_name: str, steps: int, warmup: int, micro: int, peak_tflops: float, work: Path, device: str,
        bf16: bool) -> dict:
    """The frozen parts in bf16 and the step under bf16 autocast (trainable weights fp32), or all fp32."""
    size = SIZES[size_name]
    dtype = torch.bfloat16 if bf16 else torch.float32
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ipn = build_ipn(size, work, device, dtype)
    ipn.train()
    opt = torch.optim.AdamW(ipn.trainable_parameters(), lr=1e-4)
    batches = [make_batch(ipn, size, micro, seed) for seed in range(4)]
    print(f"[train_gpu] {size_name}: LLM {sum(p.numel() for p in ipn.llm.parameters()) / 1e9:.3f}B frozen, "
          f"IPN {sum(p.numel() for p in ipn.trainable_parameters()) / 1e6:.2f}M trainable, on {device} "
          f"({dtype}); built in {time.perf_counter() - t0:.0f} s", flush=True)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def step(batch: dict) -> float:
        with autocast:
            loss = ipn(batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for i in range(warmup):
        step(batches[i % len(batches)][0])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    flops = tokens = 0.0
    losses = []
    start = time.perf_counter()
    for i in range(steps):
        batch, n = batches[i % len(batches)]
        losses.append(step(batch))  # float(loss) waits for the step
        tokens += n
        flops += step_flops(ipn, batch, n)
    seconds = time.perf_counter() - start
    mem, what = peak_memory(device)
    return {"size": size_name, "device": device, "precision": "bf16" if bf16 else "fp32", "steps": steps, "micro_batch": micro, "seconds": seconds,
            "samples_per_s": steps * micro / seconds, "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
            "peak_memory_gib": mem, "memory": what, "loss_first": losses[0], "loss_last": losses[-1]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense bf16 peak (H100/H200 SXM 989, A100 312)")
    ap.add_argument("--work", default=os.environ.get("WORK", "/tmp/lingcloud-train-gpu"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    a = ap.parse_args(argv)
    bf16 = (a.precision or ("bf16" if a.device.startswith("cuda") else "fp32")) == "bf16"
    r = run(a.size, a.steps, a.warmup, a.micro_batch, a.peak_tflops, Path(a.work), a.device, bf16)
    print(f"samples/s {r['samples_per_s']:.2f}  tokens/s {r['tokens_per_s']:.0f}  MFU {r['mfu']:.2%} "
          f"({r['tflops']:.3g} TFLOPS of {r['peak_tflops']:g})  peak {r['memory']} {r['peak_memory_gib']:.2f} GiB  "
          f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
