"""`extract:` — CLIP feature extraction (owned by the extraction stage)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from lmeye.config.base import Section


class ExtractConfig(Section):
    input: Optional[str] = Field(None, description="pairs table; default {data.root}/pairs")
    output: Optional[str] = Field(None, description="features table; default {data.root}/features")
    # the model (open_clip)
    model: str = Field(
        "ViT-L-14-quickgelu",
        description="open_clip architecture: built-in, or a JSON in configs/models/ or model_config_dirs "
        "(a tag trained with QuickGELU needs the -quickgelu architecture; a mismatch is refused)",
    )
    pretrained: Optional[str] = Field(
        "openai",
        description="open_clip pretrained tag (each model actor resolves it into its node's cache) or a checkpoint "
        "file at a path every node reads; null: random weights from `seed`",
    )
    weights_cache_dir: Optional[str] = Field(
        None, description="where each model actor caches a tag's weights on its node; null: $LINGCLOUD_WEIGHTS_CACHE "
        "on that node, else open_clip's default (~/.cache/clip or the HF hub cache)"
    )
    model_config_dirs: list[str] = Field(default_factory=list, description="extra directories of open_clip model JSONs")
    seed: int = Field(0, description="seed of random weights when pretrained is null")
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16", "bf16", "fp16"] = Field(
        "auto", description="compute precision; auto: amp_bf16 (mixed) on GPU, fp32 on CPU"
    )
    dtype: Literal["float16", "float32"] = Field("float16", description="stored dtype of embeddings and patch tokens")
    patch_tokens: bool = Field(False, description="also store the visual tower's token features (tokens x width)")
    patch_dtype: Optional[Literal["float16", "float32", "int8"]] = Field(
        None, description="stored type of the patch tokens; null: `dtype`. int8: a float16 scale per token, "
        "0.50-0.52x the bytes of float16 (README 'Compact patch tokens'); readers get floats back either way"
    )
    patch_pool: Optional[int] = Field(
        None, gt=0, description="average the patch grid to N x N regions before storing (the IPN's RVII pools to "
        "regions anyway); null: the model's full grid. Recorded in the table; a model trained on another grid refuses it"
    )
    text_embeddings: bool = Field(
        False, description="also store each caption's embedding from the same CLIP's text tower (column text_embedding; "
        "the curate stage's CLIP score is its cosine with the image embedding)")
    # the actor pool
    batch_size: int = Field(256, gt=0, description="images per model forward")
    pool_size: int = Field(1, gt=0, description="model actors (min size when pool_max_size is set)")
    pool_max_size: Optional[int] = Field(None, gt=0, description="autoscale the actor pool up to this many actors")
    num_gpus: float = Field(0, ge=0, description="GPUs per model actor; 0: run on the CPU")
    actor_num_cpus: float = Field(1, gt=0, description="CPUs reserved per model actor")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per model actor, e.g. {gpu_node: 1} to place the actors on nodes started with that resource"
    )
    torch_threads: Optional[int] = Field(
        None, gt=0, description="torch intra-op threads per actor; null: on the CPU, the node's CPUs / the model actors "
        "that fit on it (decoding is cheap and leaves its cores to the model); on a GPU, max(1, actor_num_cpus)"
    )
    actor_restarts: int = Field(
        3, ge=0, description="times a fresh actor pool redoes the unfinished shards after a model actor dies"
    )
    # read tasks (the config keys keep their decode_ names: existing configs set them)
    decode_num_cpus: float = Field(1, gt=0, description="CPUs per read task (one task per pairs shard; the images stay encoded, the model actors decode them)")
    decode_memory_mb: int = Field(1024, gt=0, description="memory reserved per read task (a worker with torch, plus a row group of image bytes)")
    decode_batch_rows: int = Field(256, gt=0, description="rows a read task reads and emits at a time (the model actors' blocks)")
    row_group_rows: int = Field(1024, gt=0, description="rows per Parquet row group of the features shards")
    debug_delay_s: float = Field(0, ge=0, description="sleep after each model batch (kill/resume tests only; keep 0)")
