"""`lmeye config validate FILE` and `lmeye config show FILE`."""

from __future__ import annotations

import argparse

import yaml

from lmeye.config import dump_config, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate or show a config file, or print the config reference")
    verbs = p.add_subparsers(dest="verb", required=True)
    ref = verbs.add_parser("reference", help="every config key with its type, default and meaning (Markdown)")
    ref.set_defaults(func=_reference)
    for verb, helptext in (("validate", "check a config file; one line per problem"), ("show", "print the resolved config")):
        v = verbs.add_parser(verb, help=helptext)
        v.add_argument("file")
        v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        v.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    if args.verb == "validate":
        print(f"{args.file}: ok")
    else:
        print(yaml.safe_dump(dump_config(cfg), sort_keys=False), end="")
    return 0


def _reference(args: argparse.Namespace) -> int:
    from lmeye.config import Config
    from lmeye.config.reference import markdown

    print(markdown(Config))
    return 0
