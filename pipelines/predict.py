"""Batch prediction: an `instructions`-style table -> the `predictions` table, a trained IPN on Ray Data.

``run(cfg) -> StageSummary``, like every stage. The flow, one Ray Data pipeline for every
unfinished shard:

1. ``from_items`` of the pending input shards (one item per shard);
2. ``map_batches(_read_shard)``, CPU tasks: the shard's rows of the configured split, in slices;
3. ``map_batches(_Predictor, compute=ActorPoolStrategy(size=pool_size))``, the model actors: each
   loads the IPN once (``lmeye.serve.loader``), reads the features of its batch's uids from the
   feature store (the version the driver pinned), asks the last user turn of each conversation
   in its context, and returns one predictions row per input row;
4. the driver streams the results into one predictions shard per input shard (same name),
   written under a temporary name and renamed when the shard has all its rows, then recorded in
   the manifest.

Resume: a predictions shard is finished when the manifest lists it with the input shard's sha256
and the same content config (checkpoint weights digest, features version, split, decoding).
Killed and rerun, only unfinished shards are redone. On 2 cores keep ``pool_size *
actor_num_cpus`` below the CPU count so the reading tasks get a CPU (a pool of 2 x 1 CPU starves them).
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import time
import traceback
from collections import Counter
from typing import Any, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye.config import Config
from lmeye.errors import UserError
from lmeye.report import StageSummary, sum_counts
from lmeye.runtime import init_ray
from lmeye.serve.loader import read_checkpoint_config
from lmeye.shard_parts import ShardAssembler, write_parts
from lmeye.tables import STAGING, TableReader, TableWriter, fingerprint, remove_temporaries
from schemas.instructions import INSTRUCTIONS, ROLE_ASSISTANT, ROLE_USER
from schemas.predictions import MISSING_FEATURES, PREDICTIONS, SUCCESS, TOO_LONG

SHARD_COL = "_shard"
PREDICTION_ROW_GROUP = 10_000  # rows a row group (the shards used to get one per arriving block)
READ_ROWS = 256


def paths(cfg: Config) -> tuple[str, str, str]:
    """(input, features, output) with the chain defaults."""
    p = cfg.predict
    root = cfg.data.root.rstrip("/")
    return (p.input or cfg.instruct.output or f"{root}/instructions",
            p.features or cfg.extract.output or f"{root}/features",
            p.output or f"{root}/predictions")


def split_turns(conversation: list[dict]) -> tuple[list[dict], str, Optional[str]]:
    """(context up to and including the last user turn, that turn's text, the reference answer or None)."""
    last_user = max((i for i, t in enumerate(conversation) if t["role"] == ROLE_USER), default=None)
    if last_user is None:
        raise ValueError("no user turn")
    after = conversation[last_user + 1:]
    reference = after[0]["content"] if after and after[0]["role"] == ROLE_ASSISTANT else None
    return conversation[: last_user + 1], conversation[last_user]["content"], reference


def checkpoint_digest(directory: str) -> str:
    """sha256 over the checkpoint's config and weight files: what decides the answers."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(directory, "*.json")) + glob.glob(os.path.join(directory, "*.safetensors"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- CPU tasks


def _read_shard(batch: pa.Table, *, split: Optional[str], rows: int) -> Iterator[pa.Table]:
    for shard, path in zip(batch.column("shard").to_pylist(), batch.column("path").to_pylist()):
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            INSTRUCTIONS.check(pf.schema_arrow, path)
            for rb in pf.iter_batches(batch_size=rows, columns=["sample_id", "uid", "task", "split", "conversation"]):
                part = pa.Table.from_batches([rb])
                if split is not None:
                    part = part.filter(pc.equal(part["split"], split))
                if part.num_rows:
                    yield part.drop_columns(["split"]).append_column(SHARD_COL, pa.array([shard] * part.num_rows, pa.string()))


# ----------------------------------------------------------------------------- model actors


class _Predictor:
    """One model actor: the IPN and the feature store, opened once."""

    def __init__(self, checkpoint: str, features: str, version: str, settings: dict[str, Any]):
        import torch

        from lmeye.serve.chat import Generation
        from lmeye.serve.loader import load_ipn_dir
        from lmeye.store import FeatureStore

        torch.set_num_threads(settings["torch_threads"])
        self.ipn = load_ipn_dir(checkpoint)
        self.store = FeatureStore.open(features, version=version)
        self.columns = [c for c in ("embedding", "patch_tokens") if c in self.store.columns]
        self.gen = Generation(max_new_tokens=settings["max_new_tokens"], num_beams=settings["num_beams"])
        self.delay = settings["debug_delay_s"]
        self.parts = settings.get("parts")

    def _features(self, uids: list[Optional[str]]) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """Embeddings, patch tokens (zeros for text-only rows) and which image rows have features."""
        n = len(uids)
        with_image = np.array([u is not None for u in uids])
        emb = np.zeros((n, self.store.dim), np.float32)
        tokens = np.zeros((n, *self.store.patch_shape), np.float32) if "patch_tokens" in self.columns else None
        found = np.zeros(n, bool)
        idx = np.flatnonzero(with_image)
        if idx.size:
            got = self.store.get([uids[i] for i in idx], self.columns, on_missing="mask")
            found[idx] = got.found
            emb[idx] = got["embedding"]
            if tokens is not None:
                tokens[idx] = got["patch_tokens"]
        return emb, tokens, found

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from lmeye.serve.chat import prepare_batch

        uids = batch.column("uid").to_pylist()
        contexts, prompts, references = [], [], []
        for conv in batch.column("conversation").to_pylist():
            ctx, prompt, ref = split_turns(conv)
            contexts.append(ctx)
            prompts.append(prompt)
            references.append(ref)
        emb, tokens, found = self._features(uids)
        has_image = np.array([u is not None for u in uids])
        status = np.where(has_image & ~found, MISSING_FEATURES, SUCCESS).astype(object)
        answers: list[Optional[str]] = [None] * len(uids)
        ask = np.flatnonzero(status == SUCCESS)
        if ask.size:
            prepared, kept = prepare_batch(
                self.ipn, [contexts[i] for i in ask], emb[ask], None if tokens is None else tokens[ask], has_image[ask]
            )
            kept_rows = ask[kept]
            status[np.setdiff1d(ask, kept_rows)] = TOO_LONG
            if prepared is not None:
                with torch.inference_mode():
                    texts = self.ipn.generate(prepared, **self.gen.kwargs())
                for i, text in zip(kept_rows, texts):
                    answers[i] = text.strip()
        if self.delay:
            time.sleep(self.delay)
        out = pa.table({
            "sample_id": batch.column("sample_id"),
            "uid": batch.column("uid"),
            "task": batch.column("task"),
            "prompt": pa.array(prompts, pa.string()),
            "answer": pa.array(answers, pa.string()),
            "reference": pa.array(references, pa.string()),
            "status": pa.array(status.tolist(), pa.string()),
            SHARD_COL: batch.column(SHARD_COL),
        })
        # the stage's: rows go to part files here (lmeye.shard_parts), only their metadata on
        return write_parts(out, **self.parts) if self.parts else out


# ----------------------------------------------------------------------------- driver side


def _part_stats(part: pa.Table) -> dict[str, dict[str, int]]:
    return {"by_status": dict(Counter(part.column("status").to_pylist()))}


def _expected_rows(reader: TableReader, names: list[str], split: Optional[str]) -> dict[str, int]:
    if split is None:
        return {n: reader.manifest.shards[n].rows for n in names}
    out = {}
    for n in names:
        col = reader.read_shard(n, columns=["split"]).column("split")
        out[n] = int(pc.sum(pc.equal(col, split)).as_py() or 0)
    return out


def run(cfg: Config) -> StageSummary:
    """Answer every row (of the configured split) not yet predicted; returns the summary."""
    import ray

    from lmeye.store import FeatureStore

    t0 = time.time()
    p = cfg.predict
    inp, features, out = paths(cfg)
    summary = StageSummary(stage="predict", output=out, rate_unit="samples/s")
    if not p.checkpoint:
        raise UserError("predict.checkpoint: not set (the IPN checkpoint folder to predict with)")
    read_checkpoint_config(p.checkpoint)  # a missing file fails here, before Ray starts
    reader = TableReader(inp, INSTRUCTIONS)
    store = FeatureStore.open(features)  # builds the serving copy once, here, for every actor
    input_sha = {n: s.sha256 for n, s in reader.manifest.shards.items()}
    content = {
        "checkpoint": checkpoint_digest(p.checkpoint), "features": store.version, "split": p.split,
        "max_new_tokens": p.max_new_tokens, "num_beams": p.num_beams,
    }
    writer = TableWriter(out, PREDICTIONS, config=content, input_fingerprint=fingerprint(input_sha))
    expected = _expected_rows(reader, reader.shard_names, p.split)
    names = [n for n in reader.shard_names if expected[n] > 0]
    pending = [n for n in names if not writer.is_done(n, input_sha[n])]
    summary.shards_skipped = len(names) - len(pending)
    processed = 0
    try:
        if pending:
            init_ray(cfg.ray)
            schema = PREDICTIONS.with_metadata(PREDICTIONS.schema)
            # the workers write the shards (lmeye.shard_parts); the driver sees part metadata only
            assembler = ShardAssembler(  # (I/O: no CPU reserved, never behind the pipeline's tasks)
                writer, schema, {n: expected[n] for n in pending},
                lambda name: {"inputs": [name], "input_fingerprint": input_sha[name]},
                row_group_rows=PREDICTION_ROW_GROUP, num_cpus=0,
            )
            parts = {"staging": out.rstrip("/") + "/" + STAGING + "/parts", "shard_col": SHARD_COL,
                     "schema": schema, "stats_of": _part_stats}
            ds = _build_dataset(cfg, reader, pending, store.version, features, parts)
            try:
                for metadata in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
                    processed += assembler.feed(metadata)
                summary.shards_done += assembler.finish()
            except BaseException:
                assembler.salvage()
                summary.shards_done += assembler.written
                raise
    except (KeyboardInterrupt, ray.exceptions.RayError, RuntimeError, OSError, ValueError) as err:
        remove_temporaries(out)  # the parts of unfinished shards
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        summary.ok = False
        summary.notes.append(f"stopped: {type(err).__name__}: {err}"[:400])
    remove_temporaries(out)
    by_status = sum_counts(info.stats.get("by_status", {}) for info in writer.manifest.shards.values())
    if summary.ok:
        writer.finalize(names, stats={"by_status": dict(by_status)},
                        metadata={"checkpoint": p.checkpoint, "features_version": store.version})
    summary.rows = writer.manifest.num_rows
    summary.counts = dict(by_status)
    summary.failures = {k: v for k, v in by_status.items() if k != SUCCESS}
    summary.seconds = time.time() - t0
    summary.rate = processed / summary.seconds if processed and summary.seconds > 0 else None
    summary.notes.insert(0, f"checkpoint {p.checkpoint}, split {p.split or 'all'}, "
                         + (f"beam search ({p.num_beams})" if p.num_beams > 1 else "greedy")
                         + f", max {p.max_new_tokens} new tokens")
    return summary


def _build_dataset(cfg: Config, reader: TableReader, pending: list[str], version: str, features: str,
                   parts: dict[str, Any]):
    import ray

    p = cfg.predict
    items = [{"shard": n, "path": f"{reader.path.rstrip('/')}/{n}"} for n in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_shard, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"split": p.split, "rows": READ_ROWS}, num_cpus=p.read_num_cpus)
    settings = {
        "torch_threads": p.torch_threads or max(1, int(p.actor_num_cpus)),
        "max_new_tokens": p.max_new_tokens, "num_beams": p.num_beams, "debug_delay_s": p.debug_delay_s,
        "parts": parts,
    }
    return ds.map_batches(
        _Predictor,
        fn_constructor_kwargs={"checkpoint": os.path.abspath(p.checkpoint), "features": os.path.abspath(features)
                               if "://" not in features else features, "version": version, "settings": settings},
        batch_size=p.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=p.pool_size), num_cpus=p.actor_num_cpus,
    )
