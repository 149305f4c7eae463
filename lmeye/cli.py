"""`lmeye`: the command line. Each subcommand lives in ``lmeye.commands.<name>`` and exposes
``register(subparsers)``; this file only wires them up and turns expected errors into one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from lmeye.config import load_config, parse_overrides
from lmeye.entry import EXIT_INTERRUPTED, INTERRUPTED, add_overwrite_arg
from lmeye.errors import user_errors

COMMANDS = [
    "config",
    "demo",
    "download",
    "extract",
    "store",
    "curate",
    "instruct",
    "train",
    "predict",
    "model",
    "eval",
    "chat",
    "app",
    "lineage",
    "regenerate",
    "verify",
]
DESCRIPTION = (
    "LingCloud: the platform behind LMEye, an Interactive Perception Network that gives a frozen LLM eyes. "
    "It builds the tables (download image-text pairs, extract CLIP features, build instruction data) on Ray, "
    "trains the IPN, serves it and evaluates it. Run `lmeye COMMAND --help` for one command."
)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (default: built-in defaults)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set download.image_size=224 (repeatable)",
    )


def config_from_args(args: argparse.Namespace, **direct: object):
    """The config file plus --set overrides, plus positional arguments given as direct overrides."""
    overrides = parse_overrides(args.overrides)
    overrides.update({k: v for k, v in direct.items() if v is not None})  # taken verbatim, not as YAML
    return load_config(args.config, overrides)


def add_stage_command(
    sub: argparse._SubParsersAction, name: str, help: str, positionals: list[tuple[str, str, str]], description: str | None = None
) -> argparse.ArgumentParser:
    """`lmeye <name> [POSITIONAL ...] [--config FILE] [--set k=v]` running ``pipelines.<name>.run``.

    ``positionals`` are (argument, config key, help): an argument given on the command line
    overrides that key of the config.
    """
    p = sub.add_parser(name, help=help, description=description or help)
    for arg, _key, arg_help in positionals:
        p.add_argument(arg, nargs="?", help=arg_help)
    add_config_args(p)
    add_overwrite_arg(p)

    def run(args: argparse.Namespace) -> int:
        from lmeye.entry import run_stage

        stage = importlib.import_module(f"pipelines.{name}").run
        cfg = config_from_args(args, **{key: getattr(args, arg) for arg, key, _ in positionals})
        return run_stage(stage, cfg, overwrite=args.overwrite)

    p.set_defaults(func=run)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmeye", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lmeye.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"lmeye.commands.{name}":
                continue  # a stage not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"lmeye {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a stage's own handling (config loading, imports)
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
