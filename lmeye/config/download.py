"""`download:` — img2dataset options. Names and meanings follow img2dataset's own arguments."""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field

from lmeye.config.base import Section

InputFormat = Literal[
    "txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "parquet"
]


class DownloadConfig(Section):
    input: Optional[str] = Field(None, description="URL list: a file or a folder of files (fsspec path)")
    output: Optional[str] = Field(None, description="pairs table; default {data.root}/pairs")
    input_format: InputFormat = Field("csv", description="img2dataset input format of the URL list")
    url_col: str = "url"
    caption_col: Optional[str] = "caption"
    # resizing, passed through to img2dataset unchanged
    image_size: int = Field(256, gt=0)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: str = "lanczos"
    downscale_interpolation: str = "area"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=0, le=100)
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = math.inf
    max_aspect_ratio: float = math.inf
    # fetching
    samples_per_shard: int = Field(10_000, gt=0, description="rows per img2dataset shard (and pairs shard)")
    thread_count: int = Field(64, gt=0, description="download threads per shard task")
    timeout: int = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0, description="per-URL retries inside img2dataset")
    max_shard_retry: int = Field(2, ge=0, description="reruns of shards whose task failed (img2dataset's Ray path has none)")
    user_agent_token: Optional[str] = None
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    dedupe_urls: bool = Field(True, description="keep the first row of each uid; uids are unique in pairs")
