"""`train:` — training the IPN with DeepSpeed on Ray Train (owned by the train stage).

Training runs as a list of *stages*, in order. The shipped configs have two, as LMEye trains:

* ``align``: feature alignment on the caption tasks; only the visual mapping trains;
* ``instruct``: instruction tuning on every task; request acquisition, RVII and transmission
  train (the visual mapping too when ``train_visual_mapping``); it starts from ``align``'s
  output because it names it in ``init_from``.

Every stage writes ``{train.output}/{stage name}/``: Ray Train's checkpoints
(``checkpoint_*``), ``model/`` (the final IPN directory), ``metrics.jsonl``, ``loss.png`` and
``summary.json``. Keys not set on a stage (``lr``, ``micro_batch_size``, ...) come from the
section.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from lmeye.config.base import Section

CAPTION_TASKS = ["short_caption", "detailed_description", "grounded_qa"]


class TrainStage(Section):
    name: str = Field(..., description="the stage's name: its output folder, and what a later stage's init_from names")
    trainable: Literal["align", "instruct"] = Field(
        ..., description="what trains: align = the visual mapping; instruct = request, RVII and transmission"
    )
    train_visual_mapping: bool = Field(False, description="instruct stages: train the visual mapping as well")
    init_from: Optional[str] = Field(
        None, description="an earlier stage's name (its model/ folder) or an IPN directory to start from; null: fresh weights"
    )
    tasks: Optional[list[str]] = Field(None, description="only rows of these tasks (null: every task)")
    exclude_tasks: list[str] = Field(default_factory=list, description="leave out rows of these tasks")
    epochs: int = Field(1, ge=1, description="passes over the selected rows")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (null: run the epochs)")
    lr: Optional[float] = Field(None, gt=0, description="peak learning rate (null: train.lr)")
    warmup_steps: Optional[int] = Field(None, ge=0, description="linear warm-up steps (null: train.warmup_steps)")
    micro_batch_size: Optional[int] = Field(None, ge=1, description="rows per worker per micro-step (null: train.micro_batch_size)")
    grad_accum: Optional[int] = Field(None, ge=1, description="micro-steps per optimizer step (null: train.grad_accum)")

    @model_validator(mode="after")
    def _tasks_disjoint(self) -> "TrainStage":
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks: empty list selects nothing; use null for every task")
        return self


def _default_stages() -> list[TrainStage]:
    return [
        TrainStage(name="align", trainable="align", tasks=list(CAPTION_TASKS)),
        TrainStage(name="instruct", trainable="instruct", init_from="align"),
    ]


class TrainConfig(Section):
    instructions: Optional[str] = Field(None, description="instructions table; default instruct.output")
    features: Optional[str] = Field(None, description="features table (read by uid through the feature store); default extract.output")
    output: Optional[str] = Field(None, description="where every stage writes its folder; default {data.root}/train")
    curation: Optional[str] = Field(
        None, description="curation table (lmeye curate) the instructions must have been built with (instruct.curation), "
        "so only its kept images are trained on; checked before training starts; null: no check")
    stages: list[TrainStage] = Field(default_factory=_default_stages, description="the stages, run in order")
    only: Optional[list[str]] = Field(None, description="run only these stages (by name; null: all)")
    resume: Literal["latest", "never"] = Field(
        "latest",
        description="latest: a stage with checkpoints continues from its last one and a finished stage is skipped; never: start over",
    )
    # -- Ray Train
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); false: CPU with gloo")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs reserved per worker (fractional is fine; Ray Data needs the rest)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers' bundles on nodes (SPREAD: one node's loss stops fewer ranks)")
    max_failures: int = Field(0, ge=-1, description="Ray Train restarts a failed worker group from the last checkpoint this often (-1: always)")
    # -- DeepSpeed
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    zero3_param_persistence_threshold: Optional[int] = Field(
        None, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank (null: DeepSpeed's default, 1e5; 0: partition every one)"
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="training precision (the frozen LLM runs in it too)")
    activation_checkpointing: bool = Field(
        False, description="recompute the frozen LLM's layer activations in the backward pass instead of keeping them (less memory; pass 2 then reruns the prefix)"
    )
    micro_batch_size: int = Field(8, ge=1, description="rows per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clipping (0: off)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="after warm-up: constant, or decay to 0 by the last step")
    # -- data
    shuffle_buffer: int = Field(256, ge=0, description="rows of the per-worker shuffle buffer (0: table order)")
    group_by_length: int = Field(
        1, ge=1, description="this many micro-batches' rows are drawn at once, sorted by length and cut into micro-batches "
                             "served in a seeded random order, so a batch pads less (1: off; lmeye.train.feed.group_by_length)")
    seed: int = Field(0, description="block order, shuffle buffer and weight initialisation")
    deterministic: bool = Field(
        True, description="Ray Data preserves order, so the same config gives the same batches on the same workers (exact resume)"
    )
    on_missing_features: Literal["skip", "error"] = Field("skip", description="a row whose uid has no features: skip and count, or stop")
    on_too_long: Literal["skip", "error"] = Field("skip", description="a row longer than model.max_length: skip and count, or stop")
    # -- checkpoints, metrics, validation
    checkpoint_every: int = Field(200, ge=1, description="optimizer steps between checkpoints (one is also written at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept per stage")
    log_every: int = Field(10, ge=1, description="optimizer steps between metric reports and progress lines")
    val_max_rows: Optional[int] = Field(2000, ge=1, description="validation rows evaluated at the end of a stage (null: all)")
    val_max_new_tokens: int = Field(16, ge=1, description="tokens generated per validation answer (exact match)")

    @model_validator(mode="after")
    def _check_stages(self) -> "TrainConfig":
        names: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in names:
                raise ValueError(f"stages.{i}: duplicate stage name '{st.name}'")
            if st.init_from == st.name:
                raise ValueError(f"stages.{i} ({st.name}): init_from names the stage itself")
            names.append(st.name)
        for name in self.only or []:
            if name not in names:
                raise ValueError(f"only: no stage named '{name}' (stages: {', '.join(names)})")
        return self
