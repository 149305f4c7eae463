"""`lmeye app --checkpoint DIR [--host 127.0.0.1] [--port 7860] [--demo-images DIR]`: the web demo."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    from lmeye.serve.app import demo_dir_default, demo_images, serve
    from lmeye.serve.loader import load_assistant

    demos = demo_images(args.demo_images or demo_dir_default())
    bot = load_assistant(args.checkpoint, features=args.features, model_config_dirs=args.model_config_dirs)
    print(f"serving {args.checkpoint} on http://{args.host}:{args.port} ({len(demos)} demo images); Ctrl-C stops")
    serve(bot, host=args.host, port=args.port, demos=demos)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lmeye.commands.chat import add_model_args

    p = sub.add_parser("app", help="the web demo: upload or pick an image, ask, read the streamed answer (Gradio)",
                       description=__doc__)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--demo-images", help="folder of images offered for picking (default: demo_out/corpus/images if there)")
    p.set_defaults(func=run)
