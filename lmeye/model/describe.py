"""Parameter counts of an IPN, part by part, and the trainable fraction; or, with ``--llm``, how
the IPN will talk to an LLM, checked before any GPU hour is spent.

    python -m lmeye.model.describe --config configs/demo.yaml [--stage instruct|align] [--set k=v]
    lmeye model describe --config configs/demo.yaml
    lmeye model describe --llm DIR [--chat-template plain|vicuna_v1|llama2|chatml|FILE.jinja]

The feature shapes come from the features table when it exists, else from the extract section's
CLIP (probed without weights). For the demo config the tiny LLM is built first if absent.
``--llm`` loads the LLM's config and tokenizer only (no weights) and prints its family, the chat
template in use, an example conversation as the IPN lays it out with the trained characters
marked, the stop tokens, and the prefix length in tokens.
"""

from __future__ import annotations

import argparse
from typing import Optional


def feature_shapes(cfg) -> tuple[int, Optional[tuple[int, int]]]:
    """(embedding dim, patch shape or None) of the features the IPN will be trained on."""
    import os

    path = cfg.extract.output
    manifest = f"{path}/_manifest.json" if path else None
    if manifest and os.path.isfile(manifest):
        import glob

        import pyarrow.parquet as pq

        from schemas.features import patch_shape_of

        shards = sorted(glob.glob(f"{path}/*.parquet"))
        if shards:
            schema = pq.read_schema(shards[0])
            return schema.field("embedding").type.list_size, patch_shape_of(schema)
    from lmeye.clip import probe_model

    spec = probe_model(cfg.extract.model, None, config_dirs=cfg.extract.model_config_dirs, with_checksum=False)
    if not cfg.extract.patch_tokens or spec.token_shape is None:
        return spec.embed_dim, None
    from lmeye.patch_codec import pooled_shape

    return spec.embed_dim, pooled_shape(tuple(spec.token_shape), cfg.extract.patch_pool)  # as the table will store them


def rows(ipn) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable parameters) for every part, frozen ones included."""
    from lmeye.model.ipn import PARTS, ClipTextRVII

    def count(params):
        params = list(params)
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    out = [("llm (frozen)", *count(ipn.llm.parameters()))]
    if isinstance(ipn.rvii, ClipTextRVII):
        out.append(("clip text tower (frozen)", *count(ipn.rvii.tower.parameters())))
    own = ipn.own_parameters()
    for part, prefixes in PARTS.items():
        out.append((part, *count(p for n, p in own.items() if n.startswith(prefixes))))
    return out


def render(ipn) -> str:
    table = rows(ipn)
    total = sum(r[1] for r in table)
    trainable = sum(r[2] for r in table)
    lines = [f"{'part':<26}{'parameters':>14}{'trainable':>14}"]
    lines += [f"{name:<26}{n:>14,}{t:>14,}" for name, n, t in table]
    lines.append(f"{'total':<26}{total:>14,}{trainable:>14,}")
    lines.append(f"trainable fraction: {trainable / total:.4%} ({trainable:,} of {total:,})")
    return "\n".join(lines)


def describe(cfg, stage: str = "instruct") -> str:
    from lmeye.model.build import build_ipn

    if cfg.model.llm is None or "lingcloud-tiny-llm" in cfg.model.llm:
        from lmeye.model.demo import ensure_demo_llm

        ensure_demo_llm(cfg)
    dim, patch = feature_shapes(cfg)
    model = cfg.model
    if model.rvii == "clip_text" and model.clip_model is None:  # as training does: the CLIP that makes the features
        model = model.model_copy(update={"clip_model": cfg.extract.model, "clip_pretrained": cfg.extract.pretrained})
    ipn = build_ipn(model, dim, patch)
    ipn.set_trainable(stage)
    head = (f"IPN: llm {cfg.model.llm} ({type(ipn.llm).__name__}, hidden {ipn.hidden}); rvii {cfg.model.rvii}; "
            f"features {dim}-d, patch tokens {patch}; stage {stage}")
    return head + "\n" + render(ipn)


EXAMPLE = [  # one image conversation of two turns: the first turn carries the IPN's slots
    {"role": "user", "content": "What colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And the background?"},
    {"role": "assistant", "content": "white"},
]
OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the characters that carry the loss


def describe_llm(model_cfg) -> str:
    """The LLM's family, template, an example with its loss mask, stop tokens and prefix length."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from lmeye.errors import UserError
    from lmeye.model.templates import template_label
    from lmeye.model.text import IMG, TextCodec

    llm = model_cfg.llm
    try:
        conf = AutoConfig.from_pretrained(llm)
        tok = AutoTokenizer.from_pretrained(model_cfg.tokenizer or llm)
    except (OSError, ValueError) as err:
        raise UserError(f"model.llm {llm!r}: cannot load its config and tokenizer ({str(err).splitlines()[0]})") from None
    codec = TextCodec(tok, num_img=model_cfg.num_img, num_img_d=model_cfg.num_img_d, max_length=model_cfg.max_length,
                      system_prompt=model_cfg.system_prompt, chat_template=model_cfg.chat_template)
    try:
        gen = GenerationConfig.from_pretrained(llm)
    except OSError:
        gen = GenerationConfig.from_model_config(conf)
    arch = ", ".join(conf.architectures or []) or type(conf).__name__
    seq2seq = bool(getattr(conf, "is_encoder_decoder", False))
    kind = "encoder-decoder" if seq2seq else "decoder-only"
    # an encoder-decoder reads the conversation up to the last answer; its decoder produces that answer
    example = EXAMPLE[:-1] if seq2seq else EXAMPLE
    lay = codec.layout(example, has_image=True, for_generation=seq2seq)
    enc = codec.encode(example, has_image=True, for_generation=seq2seq)
    if seq2seq:  # earlier answers are encoder text there, without loss
        lay.trained = [False] * len(lay.trained)
    stops = ", ".join(f"{tok.convert_ids_to_tokens(i)!r} ({i})" for i in codec.stop_ids(gen))
    prefix = len(enc["prefix_ids"]) if enc else None
    return "\n".join([
        f"LLM: {llm}",
        f"family: {conf.model_type} ({arch}), {kind}",
        f"tokenizer: {type(tok).__name__}, {len(tok)} tokens, adds BOS: {'yes' if codec.add_bos else 'no'}",
        f"chat template: {template_label(tok, model_cfg.chat_template)} (model.chat_template: null, plain, vicuna_v1, llama2, chatml or a .jinja file)",
        f"end of turn: {', '.join(repr(tok.convert_ids_to_tokens(i)) for i in codec.end_of_turn_ids) or 'none (the whole answer is trained)'}",
        f"stop tokens: {stops}",
        f"example ({OPEN}...{CLOSE}: trained characters; <img>, <img-q>, <img-d>: the IPN's slots):",
        ("encoder: " if seq2seq else "") + mark_example(lay, model_cfg.num_img, model_cfg.num_img_d),
        *([f"decoder: {OPEN}{EXAMPLE[-1]['content']}{tok.eos_token}{CLOSE}"] if seq2seq else []),
        f"prefix: {prefix} tokens (through <img-q>: {model_cfg.num_img} <img> included); "
        f"whole sample: {len(lay.ids) + model_cfg.num_img + 1 + model_cfg.num_img_d} tokens of {codec.max_length}",
    ]) + ("" if IMG in (enc or {}).get("prefix_ids", [IMG]) else "\n(the example does not fit model.max_length)")


def mark_example(lay, num_img: int, num_img_d: int) -> str:
    """The layout's text with the slots written in and the trained characters bracketed."""
    def start(j):
        return lay.offsets[j][0] if j < len(lay.offsets) else len(lay.text)

    inserts = [(start(lay.img_at), 0, "<img>" * num_img)]
    inserts.append((lay.offsets[lay.q_at - 1][1] if lay.q_at else 0, 1, "<img-q>" + "<img-d>" * num_img_d))
    for a, b in lay.trained_spans():
        inserts += [(a, 2, OPEN), (b, -1, CLOSE)]
    out, i = [], 0
    for pos, _, text in sorted(inserts):
        out.append(lay.text[i:pos] + text)
        i = pos
    return "".join(out) + lay.text[i:]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lmeye.cli import add_config_args

    add_config_args(p)
    p.add_argument("--stage", choices=["instruct", "align"], default="instruct", help="which parts train (default instruct)")
    p.add_argument("--llm", help="describe how the IPN talks to this LLM (directory) instead: template, loss mask, stop tokens")
    p.add_argument("--chat-template", help="with --llm: model.chat_template (plain, vicuna_v1, llama2, chatml or a .jinja file)")


def run(args: argparse.Namespace) -> int:
    from lmeye.cli import config_from_args

    if args.llm:
        cfg = config_from_args(args, **{"model.llm": args.llm, "model.chat_template": args.chat_template})
        print(describe_llm(cfg.model))
        return 0
    print(describe(config_from_args(args), args.stage))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    import sys

    from lmeye.errors import user_errors

    p = argparse.ArgumentParser(prog="python -m lmeye.model.describe", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except user_errors() as err:
        print(f"describe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
