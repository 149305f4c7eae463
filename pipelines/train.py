"""The train stage: the IPN trained with DeepSpeed on Ray Train, streaming the tables.

``run(cfg)`` runs the configured training stages in order (``train.stages``; the shipped configs
have ``align`` then ``instruct``, which starts from ``align``'s model). For each stage:

1. *Checks on the driver, before any worker starts* (``preflight``; each one clear error, never
   retried by Ray Train): the instructions table, the features table (opened through the feature
   store, which also builds its serving copy once, not once per worker), that the output is
   writable, the model against the features (``lmeye.train.preflight``: the LLM's architecture,
   the tokenizer and its chat template, RVII's CLIP and its activation, the patch grid), the
   ``init_from`` model and that its feature width matches the features table.
2. *Data*: the ``train`` (and ``validation``) shards of the instructions table are read with Ray
   Data (the stage's tasks pushed down as a Parquet filter), one block per shard, block order
   shuffled with the seed, re-cut into blocks of up to 8 optimizer steps (``block_steps``), and
   split across the workers with ``streaming_split`` (unequal shares allowed, so no row is
   dropped); with ``train.deterministic`` Ray Data keeps the order and the split is the same on
   every run. Workers read image features by uid from the
   feature store (memory-mapped gathers, one per batch), not through a Ray Data join: the store
   read costs a gather per batch on the worker, a join would shuffle the features table through
   the object store on every epoch.
3. *Ray Train*: a ``TorchTrainer`` with the configured workers runs ``lmeye.train.loop`` (DeepSpeed
   inside), run name = the stage name under ``train.output``; rerunning with ``resume: latest``
   continues from its last checkpoint, ``max_failures`` restarts failed workers from it.
4. *Output*: ``{train.output}/{stage}/model`` (the final IPN), ``metrics.jsonl``, ``loss.png``,
   ``summary.json``; the stage summary has rows trained and skipped, validation loss and accuracy.
   ``train.output`` may be any fsspec path (``s3://...``): every file goes through fsspec
   (``lmeye.train.storage``), Ray Train's checkpoints through the same filesystem, and a later
   stage's ``init_from`` reads the model from there.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from typing import Any, Callable, Optional

import pyarrow.dataset as pads

from lmeye.config import Config, dump_config
from lmeye.config.train import TrainConfig, TrainStage
from lmeye.errors import UserError
from lmeye.report import StageSummary, node_note
from lmeye.tables import Manifest, TableReader, fingerprint, is_local
from lmeye.train.checkpoint import ATTEMPTS, MODEL_DIR
from lmeye.train.ds_config import stage_value
from lmeye.train import preflight as checks
from lmeye.train import storage
from lmeye.train.model_factory import IPNFactory
from pipelines.instruct.curation import check_built_with
from schemas.instructions import INSTRUCTIONS, TRAIN, VALIDATION

STAGE = "train"
COLUMNS = ["sample_id", "uid", "task", "conversation"]


# ---------------------------------------------------------------------------------------------
# Paths and checks (driver, before Ray)


def train_paths(cfg: Config) -> tuple[str, str, str]:
    """(instructions, features, output) of the train stage: the ``train`` keys, else the other stages'
    outputs under ``data.root``; local ones made absolute."""
    tc = cfg.train
    output = tc.output or f"{cfg.data.root.rstrip('/')}/train"

    def absolute(path: str) -> str:  # Ray Train wants an absolute storage path; workers have their own cwd
        return os.path.abspath(path) if is_local(path) else path

    return (absolute(tc.instructions or cfg.instruct.output), absolute(tc.features or cfg.extract.output), absolute(output))




def stage_dir(output: str, stage: str) -> str:
    return f"{output.rstrip('/')}/{stage}"


def _open_features(path: str) -> Any:
    from lmeye.store import FeatureStore

    if Manifest.load(path) is None:
        raise FileNotFoundError(f"train.features: no features table at {path}; run `lmeye extract` first")
    return FeatureStore.open(path)


def _split_files(path: str) -> dict[str, list[str]]:
    if Manifest.load(path) is None:
        raise FileNotFoundError(f"train.instructions: no instructions table at {path}; run `lmeye instruct` first")
    reader = TableReader(path, INSTRUCTIONS)
    out: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    for name, file in zip(reader.shard_names, reader.files):
        out.setdefault(name.split("-", 1)[0], []).append(file)
    return out


def _task_filter(stage: TrainStage) -> Optional[pads.Expression]:
    expr = None
    if stage.tasks is not None:
        expr = pads.field("task").isin(stage.tasks)
    if stage.exclude_tasks:
        out = ~pads.field("task").isin(stage.exclude_tasks)
        expr = out if expr is None else expr & out
    return expr


def _count_rows(files: list[str], expr: Optional[pads.Expression]) -> int:
    if not files:
        return 0
    return pads.dataset(files, format="parquet").count_rows(filter=expr)


def _init_dir(stage: TrainStage, output: str, earlier: list[str]) -> Optional[str]:
    """The model directory a stage starts from: an earlier stage's model/, or a path."""
    if stage.init_from is None:
        return None
    if stage.init_from in earlier:
        return f"{stage_dir(output, stage.init_from)}/{MODEL_DIR}"
    path = stage.init_from
    if not storage.is_dir(path):
        raise FileNotFoundError(
            f"train stage {stage.name}: init_from {path!r} is neither an earlier stage's name nor a model directory"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Ray


STEPS_PER_BLOCK = 8  # optimizer steps of rows per Ray Data block (see block_steps)
MIN_BLOCKS_PER_WORKER = 4


def block_steps(rows: int, step_rows: int, workers: int) -> int:
    """Optimizer steps of rows in each block of the train split.

    ``streaming_split`` hands out whole blocks, so the workers' shares differ by up to one block:
    blocks must be small. But every block crosses the object store and the split coordinator, and
    one-step blocks starved the workers (the learning check on 2 cores, 252 steps: 41 s of a 57 s
    epoch spent waiting for batches; with 8-step blocks, 6 s). So up to ``STEPS_PER_BLOCK`` steps,
    fewer when that would leave a worker under ``MIN_BLOCKS_PER_WORKER`` blocks (small tables).
    """
    return max(1, min(STEPS_PER_BLOCK, rows // (step_rows * workers * MIN_BLOCKS_PER_WORKER)))


def steps_per_epoch(rows: int, step_rows: int, workers: int) -> int:
    """Optimizer steps of one epoch when the blocks are dealt out evenly: the worker with the most
    blocks sets the count (the others step with a zero loss once theirs run out; lmeye.train.loop)."""
    k = block_steps(rows, step_rows, workers)
    return math.ceil(math.ceil(rows / (step_rows * k)) / workers) * k


def _datasets(files: dict[str, list[str]], stage: TrainStage, tc: TrainConfig, rows: int) -> dict[str, Any]:
    """Ray Datasets of the stage's train and validation rows (see the module doc).

    The train rows are cut into blocks of a whole number of optimizer steps (``block_steps``; a
    streaming repartition of ``rows`` train rows), which keeps the split balanced to within one
    block whatever the shard sizes. The shard order is shuffled here with the seed (no barrier);
    rows are shuffled again on each worker by the shuffle buffer.
    """
    import random

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # our own progress line instead
    expr = _task_filter(stage)
    step_rows = stage_value(tc, stage, "micro_batch_size") * stage_value(tc, stage, "grad_accum")
    block_rows = step_rows * block_steps(rows, step_rows, tc.num_workers)
    out = {}
    for split in (TRAIN, VALIDATION):
        paths = list(files.get(split) or [])
        if not paths:
            continue
        if split == TRAIN and tc.shuffle_buffer:
            random.Random(tc.seed).shuffle(paths)
        ds = ray.data.read_parquet(paths, columns=COLUMNS, override_num_blocks=len(paths), shuffle=None)
        if expr is not None:  # a whole block per call, so blocks (and the split) stay as read
            ds = ds.map_batches(_select, fn_kwargs={"expr": expr}, batch_format="pyarrow", batch_size=None)
        if split == TRAIN:
            ds = ds.repartition(target_num_rows_per_block=block_rows, strict=True)
        elif tc.val_max_rows:
            ds = ds.limit(tc.val_max_rows)
        out[split] = ds
    return out


def _select(table: Any, expr: pads.Expression) -> Any:
    return pads.dataset(table).to_table(filter=expr)


def _data_config(deterministic: bool) -> Any:
    from ray.train import DataConfig

    class UnequalSplit(DataConfig):
        """Ray Train's DataConfig with ``equal=False``: equal shares would drop up to
        ``num_workers - 1`` rows an epoch; the loop copes with unequal shares instead."""

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                opts = self._resolve_execution_options(name)
                opts.preserve_order = deterministic
                ds.context.execution_options = opts
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=None)):
                    output[i][name] = split
            return output

    return UnequalSplit()


def _trainer_class(embedded: bool) -> type:
    """``TorchTrainer``, less its placement-group cleaner on the embedded Ray.

    Every ``TorchTrainer`` starts a detached actor that polls Ray's state API (which the dashboard
    serves) to remove the workers' placement group should the controller die. The embedded Ray has
    no dashboard: the poll went to whatever cluster ``/tmp/ray/ray_current_cluster`` last named (a
    stopped `ray start` one leaves it behind) and hung, and each stage then stood still 12-15 s at
    its end waiting for the actor to stop (``tests/pipelines/test_train.py``'s uninterrupted run,
    with the file there: 50 s, 36 s with this class). Without that file, it fails every second. There the
    guard has nothing to guard: the placement group ends with this process's Ray. The hook is
    Ray Train's own, not public: if it moves, the stall comes back, and nothing else changes."""
    from ray.train.torch import TorchTrainer

    if not embedded:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, PlacementGroupCleanerCallback)]

    return EmbeddedTorchTrainer


def fit(config: dict[str, Any], files: dict[str, list[str]], stage: TrainStage, tc: TrainConfig, rows: int, output: str,
        *, name: Optional[str] = None, loop: Optional[Callable[[dict[str, Any]], None]] = None) -> Any:
    """Ray Train's run of one stage (``name``: the run's folder under ``output``, default the stage's):
    ``loop`` (default ``lmeye.train.loop.train_loop``) on every worker with ``config`` (``loop_config``),
    over the stage's train and validation rows (``rows``: its train rows). Returns Ray Train's result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from lmeye.runtime import embedded
    from lmeye.train.loop import train_loop

    # checkpoints go where the output is, through the same fsspec filesystem (lmeye.train.storage)
    storage_path, storage_filesystem = storage.ray_storage(output)
    trainer = _trainer_class(embedded())(
        loop or train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker},
                                     placement_strategy=tc.placement_strategy),
        run_config=RunConfig(
            name=name or stage.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
        datasets=_datasets(files, stage, tc, rows),
        dataset_config=_data_config(tc.deterministic),
    )
    return trainer.fit()


# ---------------------------------------------------------------------------------------------
# One stage


# train keys that do not change what is trained: a rerun that changes only these resumes or is done
NOT_FINGERPRINTED = ("only", "resume", "log_every", "max_failures", "output", "placement_strategy", "checkpoint_every",
                     "keep_checkpoints", "val_max_rows", "cpus_per_worker", "activation_checkpointing")


def _stage_fingerprint(cfg: Config, stage: TrainStage, files: dict[str, list[str]], store: Any, init_dir: Optional[str],
                       any_workers: bool = False) -> str:
    """What the stage trains; ``any_workers``: the same but for ``num_workers`` (to tell a rerun on
    another number of workers from a rerun of another config)."""
    tc = dump_config(cfg)["train"]
    for k in NOT_FINGERPRINTED + (("num_workers",) if any_workers else ()):
        tc.pop(k, None)
    tc.pop("stages")
    model = getattr(cfg, "model", None)
    # a retrained earlier stage makes this one stale: its files' sizes and version marks
    init = storage.listing(init_dir) if init_dir is not None else None
    return fingerprint({"train": tc, "stage": stage.model_dump(mode="json"), "files": files, "features": store.version,
                        "model": model.model_dump(mode="json") if model is not None else None,
                        "init": [init_dir, init]})


def _finished(directory: str, fp: str) -> Optional[dict[str, Any]]:
    done = storage.read_json(f"{directory}/summary.json")
    if done is not None and done.get("fingerprint") == fp and storage.is_dir(f"{directory}/{MODEL_DIR}"):
        return done
    return None


def _check_same_run(directory: str, fp: str, fp_any_workers: str, stage: TrainStage, workers: int) -> None:
    """Checkpoints of another config or other inputs are not resumed silently. Another number of
    workers alone: DeepSpeed's optimizer state is split per rank and is not resharded here, so the
    run stops with how to go on, and the stage folder stays as it is."""
    run = storage.read_json(f"{directory}/run.json")
    if run is None:
        return
    old = run.get("fingerprint")
    if old != fp and run.get("fingerprint_any_workers") == fp_any_workers and run.get("num_workers") != workers:
        saved = storage.glob(f"{directory}/checkpoint_*/{MODEL_DIR}") or storage.glob(f"{directory}/{MODEL_DIR}")
        go_on = (f"or train a new stage with init_from: {saved[-1]} (the last saved model)" if saved
                 else "or set train.resume: never to start it over")
        raise UserError(
            f"train stage {stage.name}: {directory} was trained with train.num_workers {run.get('num_workers')}, not "
            f"{workers}, and DeepSpeed's per-rank optimizer state is not resharded; set train.num_workers: "
            f"{run.get('num_workers')} to resume, {go_on}"
        )
    if old != fp:
        raise UserError(
            f"train stage {stage.name}: {directory} holds a run of another config or other inputs; "
            "set train.resume: never to start this stage over (its checkpoints are deleted)"
        )


def _summary(stage: TrainStage, directory: str, metrics: dict[str, Any], seconds: float, ok: bool) -> StageSummary:
    s = StageSummary(stage=f"{STAGE} {stage.name}", output=f"{directory}/{MODEL_DIR}", seconds=seconds, ok=ok,
                     rate_unit="samples/s")
    s.rows = int(metrics.get("rows", 0) or 0)
    s.counts = {"steps": int(metrics.get("step", 0) or 0)}
    skipped = metrics.get("skipped", "{}")
    for reason, n in (json.loads(skipped) if isinstance(skipped, str) else skipped).items():
        if reason != "resumed_skip":
            s.failures[f"skipped: {reason}"] = n
    train_seconds = metrics.get("train_seconds") or seconds
    if train_seconds > 0 and s.rows:
        s.rate = s.rows / train_seconds  # training proper, without Ray's start-up
    if metrics.get("val_rows"):
        s.counts["val_rows"] = int(metrics["val_rows"])
    parts = [f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val_") and isinstance(v, float)]
    if parts:
        s.notes.append("validation: " + ", ".join(parts))
    elif not metrics.get("val_rows"):
        s.notes.append("validation: none (no validation rows for this stage's tasks)")
    if metrics.get("loss") is not None:
        s.notes.append(f"last step loss {metrics['loss']:.4f}")
    starts = _attempts(directory)
    if starts:
        resumed = [a["resumed_step"] for a in starts if a.get("resumed_step") is not None]
        s.notes.append(f"worker group started {len(starts)} time(s)"
                       + (f", {len(resumed)} from a checkpoint (steps {', '.join(map(str, resumed))})" if resumed else "")
                       + "; last start " + node_note(Counter(starts[-1]["nodes"]), "ranks"))
    s.notes.append(f"metrics {directory}/metrics.jsonl, loss curve {directory}/loss.png, starts {directory}/{ATTEMPTS}")
    return s


def _attempts(directory: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (storage.read_text(f"{directory}/{ATTEMPTS}") or "").splitlines() if line.strip()]


def loop_config(cfg: Config, stage: TrainStage, factory: Any, files: dict[str, list[str]], store: Any,
                init_dir: Optional[str], directory: str) -> tuple[dict[str, Any], int]:
    """What every worker of the stage gets (``lmeye.train.loop.train_loop``), and the train rows."""
    tc = cfg.train
    rows = _count_rows(files[TRAIN], _task_filter(stage))
    if rows == 0:
        raise UserError(f"train stage {stage.name}: no train rows of tasks {stage.tasks or 'any'} in the instructions table")
    micro, accum = stage_value(tc, stage, "micro_batch_size"), stage_value(tc, stage, "grad_accum")
    total = steps_per_epoch(rows, micro * accum, tc.num_workers) * stage.epochs
    total = min(total, stage.max_steps or total)
    config = {
        "cfg": dump_config(cfg), "stage": stage.model_dump(mode="json"), "factory": factory,
        "features": store.path, "features_version": store.version, "init_dir": init_dir,
        "total_steps": total, "metrics_path": f"{directory}/metrics.jsonl",
    }
    return config, rows


def _run_stage(cfg: Config, stage: TrainStage, factory: Any, files: dict[str, list[str]], store: Any,
               output: str, init_dir: Optional[str]) -> StageSummary:
    from lmeye.runtime import init_ray
    from lmeye.train.plot import plot_loss

    tc = cfg.train
    started = time.time()
    directory = stage_dir(output, stage.name)
    fp = _stage_fingerprint(cfg, stage, files, store, init_dir)
    if tc.resume == "never":
        storage.remove(directory)
    else:
        done = _finished(directory, fp)
        if done is not None:
            summary = _summary(stage, directory, done["metrics"], 0.0, True)
            summary.rate = None
            summary.notes.insert(0, "already trained with this config and these inputs; nothing redone")
            return summary
        _check_same_run(directory, fp, _stage_fingerprint(cfg, stage, files, store, init_dir, any_workers=True), stage,
                        tc.num_workers)
    config, rows = loop_config(cfg, stage, factory, files, store, init_dir, directory)
    micro, accum, total = (stage_value(tc, stage, "micro_batch_size"), stage_value(tc, stage, "grad_accum"),
                           config["total_steps"])
    storage.write_json(f"{directory}/run.json", {
        "fingerprint": fp, "num_workers": tc.num_workers,
        "fingerprint_any_workers": _stage_fingerprint(cfg, stage, files, store, init_dir, any_workers=True)})
    print(f"[train {stage.name}] {rows} train rows, {tc.num_workers} workers x {micro} rows x {accum} accumulation, "
          f"about {total} steps; output {directory}", flush=True)
    init_ray(cfg.ray)
    error = None
    try:
        result = fit(config, files, stage, tc, rows, output)
        error = result.error
    except Exception as err:  # Ray Train's own failure type varies by version; the message is what matters
        result, error = None, err
    metrics = dict(result.metrics or {}) if result is not None else {}
    ok = error is None and bool(metrics.get("final"))
    if ok:  # the final checkpoint's model (downloaded when the storage is remote) becomes the stage's
        with result.checkpoint.as_directory() as d:
            storage.upload_dir(os.path.join(d, MODEL_DIR), f"{directory}/{MODEL_DIR}")
    plot_loss(f"{directory}/metrics.jsonl", f"{directory}/loss.png", title=f"stage {stage.name}")
    summary = _summary(stage, directory, metrics, time.time() - started, ok)
    if ok:
        storage.write_json(f"{directory}/summary.json", {"fingerprint": fp, "metrics": metrics, "summary": summary.to_dict()})
    else:
        summary.notes.insert(0, f"training failed: {str(error).strip().splitlines()[-1] if error else 'no final checkpoint'}"
                                f"; rerun with train.resume: latest to continue from the last checkpoint")
    return summary


# ---------------------------------------------------------------------------------------------
# The stage


def preflight(cfg: Config, factory: Any) -> tuple[Config, dict[str, list[str]], Any, str, list[tuple[TrainStage, Optional[str]]]]:
    """Every check on the driver, before Ray starts (``lmeye.train.preflight``): the tables, the
    output, the model against the features table (through ``factory.check``), each stage's
    ``init_from`` and rows. A deterministic mistake is one error here, never a worker's failure
    that Ray Train's ``FailureConfig`` would retry. Returns the config (RVII's CLIP resolved from
    the features table when ``model.clip_model`` is null), the shard files, the feature store, the
    output and each stage with the model directory it starts from."""
    instructions, features, output = train_paths(cfg)
    tc = cfg.train
    stages = [s for s in tc.stages if tc.only is None or s.name in tc.only]
    if not stages:
        raise UserError("train.stages: no stage to run")
    files = _split_files(instructions)
    if tc.curation:  # the keep-list: instruct applied it; here it is checked to be the one the config names
        check_built_with(instructions, tc.curation)
    store = _open_features(features)
    checks.check_outputs(output)
    cfg = cfg.model_copy(update={"model": checks.with_table_clip(cfg.model, store.metadata, store.path)})
    factory.check(cfg, store)
    names = [s.name for s in tc.stages]
    plan = []
    for stage in stages:
        earlier = names[: names.index(stage.name)]
        init_dir = _init_dir(stage, output, earlier)
        running_before = stage.init_from in [s.name for s in stages[: stages.index(stage)]]
        if init_dir is not None and not running_before:
            if not storage.is_dir(init_dir):
                raise FileNotFoundError(f"train stage {stage.name}: init_from {stage.init_from}: no model at {init_dir}; "
                                        f"train stage {stage.init_from} first")
            checks.check_init_features(stage.name, init_dir, factory.feature_shape(init_dir), store)
        if _count_rows(files[TRAIN], _task_filter(stage)) == 0:
            raise UserError(f"train stage {stage.name}: no train rows of tasks {stage.tasks or 'any'} in the instructions table")
        plan.append((stage, init_dir))
    return cfg, files, store, output, plan


def run(cfg: Config, *, factory: Any = None) -> StageSummary:
    """Train every configured stage in order; print each stage's summary but the last, return the last.

    ``factory`` builds and loads the model (default ``IPNFactory``: ``lmeye.model``); tests pass a fake.
    """
    factory = factory or IPNFactory()
    cfg, files, store, output, plan = preflight(cfg, factory)
    summary: Optional[StageSummary] = None
    for stage, init_dir in plan:
        if summary is not None:
            print(summary.render(), flush=True)
        summary = _run_stage(cfg, stage, factory, files, store, output, init_dir)
        if not summary.ok:
            break
    assert summary is not None
    return summary


__all__ = ["fit", "loop_config", "preflight", "run", "stage_dir", "train_paths"]
