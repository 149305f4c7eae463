"""`curate:` — quality filters, duplicates and benchmark decontamination (owned by the curate stage).

Every filter is off when its threshold is null, so a filter runs only when asked for. Thresholds
outside their range are refused when the config is loaded, not when the stage reaches them.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from lmeye.config.base import Section


class CurateConfig(Section):
    pairs: Optional[str] = Field(None, description="pairs table; default download.output ({data.root}/pairs)")
    features: Optional[str] = Field(None, description="features table; default extract.output ({data.root}/features)")
    output: Optional[str] = Field(None, description="curation table; default {data.root}/curation")
    # metadata filters (LAION's columns are read from the pairs table when it has them)
    max_punsafe: Optional[float] = Field(None, ge=0, le=1, description="drop rows whose punsafe column is above this")
    max_pwatermark: Optional[float] = Field(None, ge=0, le=1, description="drop rows whose pwatermark column is above this")
    punsafe_column: str = Field("punsafe", description="pairs column holding LAION's NSFW probability")
    pwatermark_column: str = Field("pwatermark", description="pairs column holding LAION's watermark probability")
    min_size: int = Field(0, ge=0, description="drop images whose shorter original side is below this (pixels)")
    max_aspect_ratio: Optional[float] = Field(None, ge=1, description="drop images whose long/short side ratio is above this")
    min_caption_words: int = Field(0, ge=0, description="drop captions with fewer words")
    max_caption_words: Optional[int] = Field(None, gt=0, description="drop captions with more words")
    # CLIP image-text score (needs extract.text_embeddings: true)
    min_clip_score: Optional[float] = Field(
        None, ge=-1, le=1, description="DataComp's absolute floor on the image-caption cosine (e.g. 0.28 for ViT-B-32)")
    clip_score_top_fraction: Optional[float] = Field(
        None, gt=0, le=1, description="DataComp's relative filter: keep this top fraction of the table by CLIP score")
    # exact and near duplicates
    dedup: bool = Field(True, description="drop all but one image of each duplicate group")
    phash_max_distance: int = Field(
        4, ge=0, le=64, description="two images are duplicates when their 64-bit phashes differ in at most this many bits")
    # a perceptual hash is colour-blind: two scenes alike in layout, unlike in colour, can be a few bits apart
    phash_min_cosine: Optional[float] = Field(
        None, ge=-1, le=1, description="a phash match is a duplicate only when the embeddings' cosine is also at least this; "
        "null: the phash alone")
    semdedup_threshold: float = Field(
        0.95, gt=0, le=1, description="SemDeDup: two images are duplicates when their embeddings' cosine is at least this")
    clusters: Optional[int] = Field(None, gt=0, description="k-means clusters for SemDeDup; null: about sqrt(rows / 2), at least 1")
    kmeans_sample: int = Field(100_000, gt=0, description="rows k-means is trained on (a seeded sample; the rest are assigned)")
    kmeans_iterations: int = Field(20, gt=0, description="k-means iterations")
    partitions: int = Field(16, gt=0, description="spilled partitions of the clustered rows (one dedup task each)")
    seed: int = Field(0, description="seed of the k-means sample and initialisation")
    # benchmark decontamination
    benchmarks: list[str] = Field(
        default_factory=list, description="folders of MME, MMBench or SEED-Bench inputs, in the layouts `lmeye eval` reads")
    decontam_phash_max_distance: int = Field(
        8, ge=0, le=64, description="a training image matches a benchmark image within this many phash bits "
        "(recall first: a re-encoded copy of a flat synthetic image moves 4-8 bits; unrelated photos differ by ~32)")
    decontam_min_cosine: Optional[float] = Field(
        None, gt=0, le=1, description="... or when their CLIP image embeddings' cosine is at least this (the benchmark images "
        "are encoded on the driver by the features table's own model, as chat does); null: phash only")
    task_num_cpus: float = Field(1, gt=0, description="CPUs per scoring or dedup task")

    @model_validator(mode="after")
    def _ranges(self) -> "CurateConfig":
        if self.max_caption_words is not None and self.max_caption_words < self.min_caption_words:
            raise ValueError(f"max_caption_words ({self.max_caption_words}) is below min_caption_words ({self.min_caption_words})")
        return self
