"""One module per `lmeye` subcommand; each exposes ``register(subparsers)``."""
