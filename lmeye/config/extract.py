"""`extract:` — CLIP feature extraction (owned by the extraction stage)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmeye.config.base import Section


class ExtractConfig(Section):
    input: Optional[str] = Field(None, description="pairs table; default {data.root}/pairs")
    output: Optional[str] = Field(None, description="features table; default {data.root}/features")
