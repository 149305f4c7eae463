"""`predict:` — batch prediction of a trained IPN over an instructions-style table (owned by the predict stage)."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from lmeye.config.base import Section


class PredictConfig(Section):
    checkpoint: Optional[str] = Field(None, description="IPN checkpoint folder (ipn_config.json + safetensors); required")
    input: Optional[str] = Field(None, description="instructions-style table; default instruct.output ({data.root}/instructions)")
    features: Optional[str] = Field(None, description="features table the uids are read from; default extract.output")
    output: Optional[str] = Field(None, description="predictions table; default {data.root}/predictions")
    split: Optional[str] = Field("validation", description="only rows of this split (train | validation); null: every row")
    max_new_tokens: int = Field(32, gt=0, description="answer length cap in tokens")
    num_beams: int = Field(1, gt=0, description="1: greedy decoding; more: beam search (deterministic either way)")
    batch_size: int = Field(16, gt=0, description="samples per model call")
    pool_size: int = Field(1, gt=0, description="model actors")
    actor_num_cpus: float = Field(1, gt=0, description="CPUs reserved per model actor (fractions allowed: on 2 cores keep pool_size x this < 2)")
    read_num_cpus: float = Field(0.5, gt=0, description="CPUs per shard-reading task")
    torch_threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads per actor; null: max(1, actor_num_cpus)")
    debug_delay_s: float = Field(0, ge=0, description="sleep after each model batch (kill/resume tests only; keep 0)")
