"""Errors a user can fix from the message alone. The CLI and job entry points print these as
one line (exit code 2) instead of a traceback; everything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input named by file, row or key."""


class OutputNotWritable(OSError):
    """The output location cannot be written; raised before any work starts (``lmeye.tables``)."""


def user_errors() -> tuple[type[BaseException], ...]:
    from lmeye.config import ConfigError
    from schemas import SchemaError

    return (ConfigError, SchemaError, OutputNotWritable, FileNotFoundError, UserError)
