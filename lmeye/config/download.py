"""`download:` — img2dataset options. Names and meanings follow img2dataset's own arguments."""

from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from lmeye.config.base import Section
from schemas.pairs import RESERVED_COLUMNS

InputFormat = Literal[
    "txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "parquet", "parquet.gz"
]
# img2dataset's names for OpenCV interpolations (img2dataset.resizer): checked at config load,
# not when the first shard is resized on a worker.
Interpolation = Literal["nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"]


class DownloadConfig(Section):
    input: Optional[str] = Field(None, description="URL list: a file or a folder of files (fsspec path)")
    output: Optional[str] = Field(None, description="pairs table; default {data.root}/pairs")
    input_format: Optional[InputFormat] = Field(
        None, description="format of the URL list; null: from the file extension (the summary says which)")
    url_col: str = Field("url", description="column of the URL list holding the URL")
    caption_col: Optional[str] = Field("caption", description="column holding the caption; null: none")
    column_names: Optional[list[str]] = Field(
        None, min_length=1,
        description="csv/tsv lists without a header line (CC3M's released TSV: [caption, url]): the columns' "
                    "names, in order; every line is then a row. null: the first line is the header")
    additional_columns: list[str] = Field(
        [], description="columns of the URL list kept in the pairs table after its own (LAION: NSFW or punsafe, "
                        "pwatermark, similarity, LICENSE, WIDTH, HEIGHT); numbers, booleans, or text")
    # resizing, passed through to img2dataset unchanged
    image_size: int = Field(256, gt=0, description="side of the stored image after resizing")
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = Field(
        "border", description="img2dataset resize mode")
    resize_only_if_bigger: bool = Field(False, description="never upscale")
    upscale_interpolation: Interpolation = Field("lanczos", description="cv2 interpolation when upscaling")
    downscale_interpolation: Interpolation = Field("area", description="cv2 interpolation when downscaling")
    encode_format: Literal["jpg", "png", "webp"] = Field("jpg", description="format of the stored image bytes")
    encode_quality: int = Field(95, ge=0, le=100, description="jpg/webp quality (png: compression 0-9)")
    skip_reencode: bool = Field(False, description="keep the original bytes when no resize is needed")
    disable_all_reencoding: bool = Field(False, description="store the downloaded bytes as they are (no resize)")
    min_image_size: int = Field(0, ge=0, description="reject images whose smaller side is below this")
    max_image_area: float = Field(math.inf, description="reject images with more pixels than this")
    max_aspect_ratio: float = Field(math.inf, description="reject images more elongated than this")
    # fetching
    samples_per_shard: int = Field(10_000, gt=0, description="rows per img2dataset shard (and pairs shard)")
    thread_count: int = Field(64, gt=0, description="download threads per shard task")
    timeout: int = Field(10, gt=0, description="seconds per request")
    retries: int = Field(0, ge=0, description="per-URL retries inside img2dataset")
    max_response_bytes: int = Field(
        64 << 20, gt=0, description="a response body larger than this is a failed row (never read whole); "
        "only http and https URLs are fetched")
    max_shard_retry: int = Field(2, ge=0, description="reruns of shards whose task failed (img2dataset's Ray path has none)")
    user_agent_token: Optional[str] = Field(None, description="added to the User-Agent header")
    disallowed_header_directives: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that make a URL a failed row (site opt-outs are honoured)")
    dedupe_urls: bool = Field(True, description="keep the first row of each uid; uids are unique in pairs")

    @model_validator(mode="after")
    def _check_additional_columns(self) -> "DownloadConfig":
        seen: set[str] = set()
        for name in self.additional_columns:
            if name in seen:
                raise ValueError(f"additional_columns: '{name}' is listed twice")
            if name in RESERVED_COLUMNS or name in (self.url_col, self.caption_col):
                raise ValueError(f"additional_columns: '{name}' is a column the pairs table or img2dataset "
                                 "already writes (or the url/caption column); rename it in the URL list")
            seen.add(name)
        if self.additional_columns and self.input_format in ("txt", "txt.gz"):
            raise ValueError("additional_columns: a txt list has no columns besides the URL")
        return self
