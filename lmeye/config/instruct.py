"""`instruct:` — LMEyeMID-style instruction data (owned by the instruct stage)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmeye.config.base import Section


class InstructConfig(Section):
    output: Optional[str] = Field(None, description="instructions table; default {data.root}/instructions")
