"""One IPN answer with prefix KV reuse vs two full passes (upstream LMEye's way), same inputs.

    .venv/bin/python benchmarks/ipn.py [--family llama] [--hidden 512] [--layers 8] \
        [--prefix-words 150] [--answer-words 12] [--batch 4] [--new-tokens 16] [--repeats 5] [--device cpu]

A random LLM of ``--family`` (built from a transformers config) around the demo tokenizer and the
tiny CLIP; one batch of image questions whose prefix (template + <img> + the user's text + <img-q>)
is ``--prefix-words`` words long. Measured, interleaved, median of ``--repeats``:
  * training step (forward + backward of the loss): ``ipn(batch)`` (pass 1 over the prefix, pass 2
    over <img-d> + answer on the prefix cache) vs ``ipn(batch, reuse_prefix=False)`` (pass 2 reruns
    the whole sequence);
  * answering (``generate`` of ``--new-tokens`` greedy tokens, batch 1): from the prefix cache vs
    generate over the full embeddings without it.
Prints each time and the ratio full / reuse (> 1: reuse is faster). The logits of both paths are
checked to agree (<= 1e-4) first, so the two paths compute the same thing.

``--family t5`` (an encoder-decoder, lmeye.model.seq2seq): there is no cache to reuse, the encoder
attends both ways, so pass 2 reruns it over the whole prompt. Measured instead: the training step
as the IPN runs it (pass 1, the encoder over the prefix for the request; pass 2, the encoder over
prefix + <img-d> + rest, and the decoder) vs the same step with pass 1 skipped (a fixed request),
and the same for answering: the ratio is what the request's extra encoder pass costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.model import IPN, build_ipn  # noqa: E402
from lmeye.model.demo import build_tiny_llm  # noqa: E402
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, features, tiny_clip_checkpoint, tiny_model_config, tiny_tokenizer  # noqa: E402

SIZES = {  # family -> config keys for --hidden / --layers
    "llama": ("hidden_size", "num_hidden_layers", {"intermediate_size": 4, "num_attention_heads": 64, "num_key_value_heads": 64}),
    "qwen2": ("hidden_size", "num_hidden_layers", {"intermediate_size": 4, "num_attention_heads": 64, "num_key_value_heads": 64}),
    "gpt2": ("n_embd", "n_layer", {"n_head": 64}),
}


def build_t5(args, root: str) -> IPN:
    """A random T5 (d_model --hidden, --layers encoder and decoder layers) around the demo tokenizer."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "t5", d_model=args.hidden, d_ff=4 * args.hidden, d_kv=64, num_heads=max(1, args.hidden // 64), num_layers=args.layers,
        vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(f"{root}/llm")
    tok.save_pretrained(f"{root}/llm")
    cfg = tiny_model_config(f"{root}/llm", tiny_clip_checkpoint(f"{root}/clip.safetensors"), max_length=2048)
    return build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE).to(args.device)


def build(args, root: str) -> IPN:
    if args.family == "t5":
        return build_t5(args, root)
    tok = tiny_tokenizer()
    h_key, l_key, extra = SIZES[args.family]
    sizes = {h_key: args.hidden, l_key: args.layers, "max_position_embeddings" if args.family != "gpt2" else "n_positions": 2048}
    for k, per in extra.items():  # widths that scale with --hidden: 4x MLP, heads of 64
        sizes[k] = args.hidden * per if k.startswith("intermediate") else max(1, args.hidden // per)
    llm = build_tiny_llm(f"{root}/llm", args.family, tok, **sizes)
    cfg = tiny_model_config(llm, tiny_clip_checkpoint(f"{root}/clip.safetensors"), max_length=2048)
    ipn = build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE).to(args.device)
    with torch.no_grad():
        torch.nn.init.normal_(ipn.transmit.weight, std=0.1)  # a trained-looking IPN: <img-d> depend on the request
    return ipn


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="llama", choices=sorted(SIZES) + ["t5"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prefix-words", type=int, default=150)
    p.add_argument("--answer-words", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        ipn = build(args, root)
        words = ("the red circle is at the top left and the blue square is in the centre " * 100).split()
        question = " ".join(words[: args.prefix_words]) + ". What colour is the circle?"
        answer = " ".join(words[: args.answer_words])
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        encs = [ipn.encode(conv, True)] * args.batch
        emb, patches = features(args.batch)
        batch = {k: v.to(args.device) for k, v in ipn.collate(encs, emb, patches).items()}
        prompt = {k: v.to(args.device) for k, v in ipn.collate([ipn.encode(conv[:1], True, for_generation=True)], emb[:1], patches[:1]).items()}
        print(f"{args.family}: hidden {args.hidden}, {args.layers} layers, {sum(p.numel() for p in ipn.llm.parameters()):,} LLM parameters; "
              f"prefix {batch['prefix_ids'].shape[1]} tokens, suffix {batch['suffix_ids'].shape[1]} (k=5 <img-d> + answer), batch {args.batch}; "
              f"device {args.device}, {torch.get_num_threads()} threads")
        if args.family == "t5":
            return encoder_decoder(ipn, batch, prompt, args)
        with torch.no_grad():
            a, b = ipn(batch, return_logits=True), ipn(batch, reuse_prefix=False, return_logits=True)
            diff = (a.logits - b.logits)[batch["suffix_mask"].bool()].abs().max().item()
        assert diff <= 1e-4, diff
        print(f"check: max |logit difference| reuse vs full = {diff:.2e}")

        def step(reuse: bool):
            ipn.zero_grad()
            ipn(batch, reuse_prefix=reuse).loss.backward()

        def answer_once(reuse: bool):
            ipn.generate(prompt, max_new_tokens=args.new_tokens, reuse_prefix=reuse, min_new_tokens=args.new_tokens)

        for name, fn in (("training step (fwd+bwd)", step), (f"answer ({args.new_tokens} new tokens)", answer_once)):
            reuse_t, full_t = compare(fn, args)
            print(f"{name:<28} reuse {reuse_t * 1e3:8.1f} ms   two full passes {full_t * 1e3:8.1f} ms   ratio {full_t / reuse_t:5.2f}x")


def compare(fn, args) -> tuple[float, float]:
    """Median times of fn(True) and fn(False), interleaved, after a warm-up of each."""
    fn(True), fn(False)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for flag in (True, False):
            times[flag].append(timed(lambda: fn(flag), args.device))
    return statistics.median(times[True]), statistics.median(times[False])


def encoder_decoder(ipn, batch, prompt, args) -> None:
    """T5: the IPN's step and answer (with pass 1) vs the same with pass 1 skipped (a fixed request)."""
    fixed = {}
    with torch.no_grad():
        for name, b in (("batch", batch), ("prompt", prompt)):
            p = ipn.prefix_embeds(b)
            fixed[name] = ipn.llm.get_encoder()(inputs_embeds=p, attention_mask=b["prefix_mask"]).last_hidden_state[:, -1]

    def step(with_pass1: bool):
        ipn.zero_grad()
        emb, mask = ipn.encoder_inputs(batch, None if with_pass1 else fixed["batch"])
        ipn.llm(inputs_embeds=emb, attention_mask=mask, labels=batch["decoder_labels"]).loss.backward()

    def answer_once(with_pass1: bool):
        with torch.no_grad():
            emb, mask = ipn.encoder_inputs(prompt, None if with_pass1 else fixed["prompt"])
            ipn.llm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    for name, fn in (("training step (fwd+bwd)", step), (f"answer ({args.new_tokens} new tokens)", answer_once)):
        with_t, without_t = compare(fn, args)
        print(f"{name:<28} IPN (2 encoder passes) {with_t * 1e3:8.1f} ms   pass 1 skipped {without_t * 1e3:8.1f} ms   "
              f"pass 1 costs {with_t / without_t - 1:6.1%}")


if __name__ == "__main__":
    main()
