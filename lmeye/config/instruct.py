"""`instruct:` — LMEyeMID-style instruction data (owned by the instruct stage)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmeye.config.base import Section


class InstructConfig(Section):
    pairs: Optional[str] = Field(None, description="pairs table (maps image references to uids); default download.output")
    features: Optional[str] = Field(None, description="features table (rows whose image has none are left out); default extract.output")
    output: Optional[str] = Field(None, description="instructions table; default {data.root}/instructions")
