"""`lmeye chat --checkpoint DIR [--image PATH_OR_URL] ["question"]`: ask the IPN, answer streamed.

Without a question it is interactive: one question per line; `/image PATH_OR_URL` switches the
image, `/image` alone goes text-only, an empty line or end of input quits.
"""

from __future__ import annotations

import argparse
import sys


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `lmeye chat` and `lmeye app`: the checkpoint and its features table."""
    p.add_argument("--checkpoint", required=True, help="IPN checkpoint folder (ipn_config.json + safetensors)")
    p.add_argument("--features", help="features table the model was trained on (default: named by the checkpoint)")
    p.add_argument("--model-config-dir", dest="model_config_dirs", action="append", default=[],
                   help="extra directory of open_clip model JSONs (as extract.model_config_dirs)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1, help="beam search (the answer then arrives at once)")


def generation_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                top_p=args.top_p, num_beams=args.num_beams)


def _answer(bot, image, question: str, gen: dict, out) -> None:
    for piece in bot.ask(image, question, stream=True, **gen):
        out.write(piece)
        out.flush()
    out.write("\n")


def run(args: argparse.Namespace) -> int:
    from lmeye.errors import UserError
    from lmeye.serve.loader import load_assistant

    bot = load_assistant(args.checkpoint, features=args.features, model_config_dirs=args.model_config_dirs)
    gen = generation_kwargs(args)
    image = args.image
    if image is not None:
        bot.features(image)  # a bad image fails now, before any question
    if args.question:
        _answer(bot, image, " ".join(args.question), gen, sys.stdout)
        return 0
    print(f"image: {image or 'none (text only)'}; /image PATH_OR_URL to switch, empty line to quit", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        if line.startswith("/image"):
            image = line[len("/image"):].strip() or None
            try:
                if image is not None:
                    bot.features(image)
                print(f"image: {image or 'none (text only)'}", file=sys.stderr)
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                image = None
            continue
        try:
            _answer(bot, image, line, gen, sys.stdout)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="ask a trained IPN about an image (streamed answer; interactive without a question)",
                       description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--image", help="image file or http(s) URL (default: a text-only question)")
    add_generation_args(p)
    p.add_argument("question", nargs="*", help="the question (omit for the interactive mode)")
    p.set_defaults(func=run)
