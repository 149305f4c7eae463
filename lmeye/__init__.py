"""LingCloud: the platform behind LMEye (IPN). Library code; entry points live in ``lmeye.cli`` and ``jobs/``."""

__version__ = "0.1.0"
