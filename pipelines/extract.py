"""Extraction stage: the `pairs` table -> the `features` table, open_clip on Ray Data.

One entry function, ``run(cfg) -> StageSummary``; it connects to Ray itself (``init_ray``, a
no-op when Ray is up) once its inputs and model have been checked, and only if work is left. The flow, one Ray Data pipeline for every unfinished shard:

1. ``from_items`` of the pending pairs shards (one item per shard);
2. ``map_batches(read_shard)``, CPU tasks: each reads its shard's ``success`` rows in slices
   of ``decode_batch_rows`` and emits them with the image still encoded (decoded, a 224x224
   image is 150,528 bytes through Ray's object store, many times its JPEG; measured by
   ``benchmarks/extract.py --transfer``);
3. ``map_batches(Encoder, compute=ActorPoolStrategy(...), num_gpus=...)``, the model actors:
   decoding with PIL and the PIL half of the model's own preprocessing (resize, crop, RGB) on the
   actor's threads, right before the forward pass (an image that does not decode becomes a row
   with its error), the tensor half (scale, normalise), the visual tower under the
   configured precision (bf16 autocast on GPU by default), L2-normalised pooled embeddings
   and, when asked, the visual tower's token features, as Arrow ``fixed_size_list`` columns.
   Each actor obtains the weights itself (a tag through open_clip into its node's cache; a file
   at a path every node reads, sha256-checked). On the CPU its torch threads default to the
   node's CPUs over the model actors there (``auto_torch_threads``). Ray's actor restarts are off
   (Ray Data's constructor arguments live in the object store, where a restart cannot get them
   back); a lost actor makes ``run`` start a fresh pipeline over the shards not yet written;
4. the driver streams the results (``iter_batches``) into one features shard per pairs shard,
   written under a temporary name in row groups of ``row_group_rows`` and renamed when the
   shard has all its rows (on object stores: uploaded under its final key), then recorded in the manifest. Memory stays bounded by the blocks
   in flight, not by the corpus or the shard size. Progress is one line of images done / to do;
   the summary separates start-up (up to the first results) from the steady-state rate.

Resume: a features shard is finished when the manifest lists it with the pairs shard's sha256
as input fingerprint and the same content config (model, checkpoint checksum, precision,
dtype, patch tokens, preprocessing). Killed and rerun, only unfinished shards are redone.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any, Iterator, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye import clip, patch_codec
from lmeye.config import Config, ExtractConfig
from lmeye.errors import UserError
from lmeye.report import StageSummary, node_note, sum_counts
from lmeye.runtime import init_ray, storage_runtime_env
from lmeye.shard_parts import ShardAssembler, assemble_shard, write_parts
from lmeye.tables import STAGING, ShardInfo, TableReader, TableWriter, fingerprint, remove_temporaries
from schemas.features import FAILED_TO_DECODE, FEATURES, SUCCESS, TEXT_EMBEDDING, features_schema
from schemas.pairs import PAIRS
from schemas.pairs import SUCCESS as PAIRS_SUCCESS

log = logging.getLogger(__name__)

SHARD_COL = "_shard"
NODE_COL = "_node"  # the Ray node of the model actor that encoded a row (per-shard stats, never written)
IMAGE_COL = "_image"  # the encoded image bytes, decoded by the model actor
CAPTION_COL = "_caption"  # carried to the model actors only with extract.text_embeddings


# ----------------------------------------------------------------------------- CPU tasks


def preprocess_key(spec: Any) -> str:
    """The model's preprocessing settings as one hashable string (the key ``_pil_part`` caches on)."""
    return _key_of(spec.preprocess_cfg)


def _key_of(preprocess_cfg: dict[str, Any]) -> str:
    import json

    return json.dumps({k: _norm(v) for k, v in preprocess_cfg.items()}, sort_keys=True)


def pil_part_of(spec: Any):
    """The PIL half of ``spec``'s preprocessing: what decoding applies before the model actor (chat and
    eval decode a new image with it, as extraction decoded the table's)."""
    return _pil_part(preprocess_key(spec))


def local_encoder(spec: Any, settings: dict[str, Any]) -> "Encoder":
    """The model actor's encoder, built in this process (no Ray): ``encode_pixels`` runs the tensor
    half of the preprocessing and the visual tower exactly as extraction did (chat and eval)."""
    return Encoder(spec.to_dict(), settings)


@lru_cache(maxsize=4)
def _pil_part(preprocess_key: str):
    import json

    cfg = json.loads(preprocess_key)
    cfg["size"] = tuple(cfg["size"]) if isinstance(cfg["size"], list) else cfg["size"]
    for k in ("mean", "std"):
        cfg[k] = tuple(cfg[k])
    pil_part, _ = clip.split_transform(clip.build_transform(cfg))
    return pil_part


_ADDR = re.compile(r" at 0x[0-9a-fA-F]+")


def _reason(err: BaseException) -> str:
    msg = _ADDR.sub("", str(err)).strip()
    return f"{type(err).__name__}: {msg}"[:300] if msg else type(err).__name__


def decode_image(data: bytes, pil_part, size: tuple[int, int]) -> np.ndarray:
    """Bytes -> HxWx3 uint8 through the PIL half of the model's preprocessing; raises on a bad image."""
    from PIL import Image

    if data is None:
        raise ValueError("no image bytes")
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decode fully here: truncated files fail now, with their reason
        return clip.to_pixels(pil_part, img, size)


def read_shard(batch: pa.Table, *, rows: int, captions: bool = False) -> Iterator[pa.Table]:
    """One pairs shard -> batches of (uid, _shard, _image[, _caption]) for its success rows.

    The image stays encoded: the model actor decodes it right before its forward pass, so what
    crosses Ray's object store is the JPEG, not 150,528 bytes of 224x224 pixels. This task only
    reads and filters, which is cheap."""
    for shard, path in zip(batch.column("shard").to_pylist(), batch.column("path").to_pylist()):
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            PAIRS.check(pf.schema_arrow, path)
            for rb in pf.iter_batches(batch_size=rows, columns=["uid", "status", "image"] + (["caption"] if captions else [])):
                part = pa.Table.from_batches([rb])
                part = part.filter(pc.equal(part["status"], PAIRS_SUCCESS))
                n = part.num_rows
                if n == 0:
                    continue
                out = {
                    "uid": part["uid"],
                    SHARD_COL: pa.array([shard] * n, pa.string()),
                    IMAGE_COL: part["image"],
                }
                if captions:
                    out[CAPTION_COL] = part["caption"]
                yield pa.table(out)


# ----------------------------------------------------------------------------- model actors


def _vectors(values: np.ndarray, mask: Optional[np.ndarray]) -> pa.Array:
    n, width = values.shape
    return pa.FixedSizeListArray.from_arrays(
        pa.array(values.reshape(-1)), width, mask=None if mask is None else pa.array(mask)
    )


class Encoder:
    """One model actor: the tensor half of the preprocessing and the visual tower."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any]):
        import torch

        self.torch = torch
        self.settings = settings
        self.node = _this_node()
        threads = settings["torch_threads"]
        if not threads and settings["num_gpus"] == 0:
            threads = auto_torch_threads(_node_cpus(), settings["actor_num_cpus"], settings["pool_max"])
        if threads:
            torch.set_num_threads(threads)
        want_gpu = settings["num_gpus"] > 0
        if want_gpu and not torch.cuda.is_available():
            raise RuntimeError("extract.num_gpus > 0 but this worker sees no CUDA device")
        self.device = "cuda" if want_gpu else "cpu"
        self.precision = settings["precision"]
        if spec["checkpoint"]:  # a file: every node must read the same bytes the driver hashed
            sha = clip.file_sha256(spec["checkpoint"])
            if sha != spec["checkpoint_sha256"]:
                raise RuntimeError(
                    f"{spec['checkpoint']}: sha256 {sha[:12]}... on this node, {spec['checkpoint_sha256'][:12]}... "
                    "on the driver; a checkpoint file must be the same on every node (shared storage)"
                )
        # a tag is resolved here, by open_clip, into this node's cache: never a driver-only path
        self.visual, preprocess, self.text = clip.load_towers(
            spec["model"],
            spec["pretrained"],
            device=self.device,
            precision=self.precision,
            seed=spec["seed"],
            config_dirs=settings["model_config_dirs"],
            output_tokens=settings["patch_tokens"],
            cache_dir=clip.weights_cache_dir(settings["weights_cache_dir"]),
            text=settings.get("text_embeddings", False),  # off unless asked (settings built by hand: tests, benchmarks)
        )
        got = dict(self.visual.preprocess_cfg)
        want = spec["preprocess_cfg"]
        if {k: _norm(v) for k, v in got.items()} != {k: _norm(v) for k, v in want.items()}:
            raise RuntimeError(f"model preprocessing on the worker {got} differs from the driver's {want}")
        _, self.tensor_steps = clip.split_transform(preprocess)
        self.pil_part = _pil_part(_key_of(want))
        # Decoding runs here, before the forward pass, on the actor's CPUs: PIL releases the GIL
        # while it decodes and resizes, so threads scale (a GPU actor would otherwise wait on one core).
        self.decode_threads = threads or torch.get_num_threads()
        self._decode_pool: Optional[ThreadPoolExecutor] = None
        _, autocast, input_dtype = clip.PRECISIONS[self.precision]
        self.autocast = getattr(torch, autocast) if autocast else None
        self.input_dtype = getattr(torch, input_dtype)
        self.store = np.dtype(settings["dtype"])
        self.size = tuple(spec["image_size"])
        self.embed_dim = spec["embed_dim"]
        self.patch_pool = settings.get("patch_pool")
        self.patch_codec = patch_codec.codec(settings.get("patch_encoding") or settings["dtype"])
        self.token_shape = (
            patch_codec.pooled_shape(tuple(spec["token_shape"]), self.patch_pool) if spec["token_shape"] else None
        )

    def _run(self, fn, *args):
        """``fn(*args)`` in inference mode, under the precision's autocast."""
        torch = self.torch
        with torch.inference_mode():
            if self.autocast is not None:
                with torch.autocast(device_type=self.device.split(":")[0], dtype=self.autocast):
                    return fn(*args)
            return fn(*args)

    def encode_pixels(self, pixels: np.ndarray):
        """(pooled embeddings, patch tokens or None) of a batch of HxWx3 uint8 images, stored dtypes."""
        torch = self.torch
        x = clip.pixels_to_tensor(pixels, self.tensor_steps, self.device).to(self.input_dtype)
        out = self._run(self.visual, x)
        pooled, tokens = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        emb = torch.nn.functional.normalize(pooled.float(), dim=-1)
        emb = emb.to(torch.float16 if self.store == np.float16 else torch.float32).cpu().numpy()
        if tokens is not None:
            tokens = patch_codec.pool_grid(tokens, self.patch_pool)
            # float encodings are cast on the device, as before; int8 is quantised from float32 rows
            tokens = tokens.to(torch.float16 if self.patch_codec.dtype == "float16" else torch.float32).cpu().numpy()
        return emb, tokens

    def decode(self, images: list[Optional[bytes]]) -> tuple[np.ndarray, list[Optional[str]]]:
        """Encoded images -> (NxHxWx3 uint8 through the PIL half of the preprocessing, per-row error or
        None). An image that does not decode is a row with its reason (zeros for its pixels), never a raise."""
        h, w = self.size
        pixels = np.zeros((len(images), h, w, 3), dtype=np.uint8)

        def one(i: int) -> Optional[str]:
            try:
                pixels[i] = decode_image(images[i], self.pil_part, self.size)
            except Exception as err:  # noqa: BLE001 - any decode failure is a failed row
                return _reason(err)
            return None

        if self.decode_threads > 1 and len(images) > 1:
            if self._decode_pool is None:
                self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode")
            errors = list(self._decode_pool.map(one, range(len(images))))
        else:
            errors = [one(i) for i in range(len(images))]
        return pixels, errors

    def __call__(self, batch: pa.Table) -> pa.Table:
        pixels, errors = self.decode(batch.column(IMAGE_COL).to_pylist())
        return self.encode_block(batch, pixels, errors)

    def encode_block(self, batch: pa.Table, pixels: np.ndarray, error_list: list[Optional[str]]) -> pa.Table:
        """One block's output rows (or, in the stage, the metadata of the parts they were written to)
        from its decoded pixels; a row with an error is a failed_to_decode row."""
        n = batch.num_rows
        errors = pa.array(error_list, pa.string())
        ok = np.array([e is None for e in error_list], dtype=bool)
        emb = np.zeros((n, self.embed_dim), dtype=self.store)
        tokens = None
        if self.settings["patch_tokens"]:
            t, d = self.token_shape
            tokens = np.zeros((n, t * d), dtype=np.float16 if self.patch_codec.dtype == "float16" else np.float32)
        idx = np.flatnonzero(ok)
        # Fixed chunks of whole blocks: CPU matmuls round by batch composition, so a row's
        # features must not depend on which rows of other shards arrived beside it.
        step = self.settings["batch_size"]
        for start in range(0, idx.size, step):
            part = idx[start:start + step]
            e, tok = self.encode_pixels(pixels[part])
            emb[part] = e
            if tokens is not None:
                tokens[part] = tok.reshape(part.size, -1)
        if self.settings["debug_delay_s"]:
            time.sleep(self.settings["debug_delay_s"])
        failed = ~ok
        text = self._captions(batch, ok) if self.text is not None else None
        cols = {
            "uid": batch.column("uid"),
            "status": pa.array(np.where(ok, SUCCESS, FAILED_TO_DECODE), pa.string()),
            "error_message": errors,
            "embedding": _vectors(emb, failed if failed.any() else None),
        }
        if tokens is not None:
            values, scales = self.patch_codec.encode(tokens.reshape(n, *self.token_shape))
            cols["patch_tokens"] = _vectors(values, failed if failed.any() else None)
            if scales is not None:
                cols["patch_scales"] = _vectors(scales, failed if failed.any() else None)
        if text is not None:
            cols[TEXT_EMBEDDING] = _vectors(*text)
        cols[SHARD_COL] = batch.column(SHARD_COL)
        cols[NODE_COL] = pa.array([self.node] * n, pa.string())  # counted per shard, not written
        parts = self.settings.get("parts")  # the stage's: rows go to part files here, only metadata on
        return write_parts(pa.table(cols), **parts) if parts else pa.table(cols)


    def _captions(self, batch: pa.Table, ok: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Caption embeddings of the decoded rows (null for a failed image or a missing caption)."""
        torch = self.torch
        captions = batch.column(CAPTION_COL).to_pylist()
        has = ok & np.array([bool(c) for c in captions])
        out = np.zeros((batch.num_rows, self.embed_dim), dtype=self.store)
        idx = np.flatnonzero(has)
        step = self.settings["batch_size"]
        for start in range(0, idx.size, step):
            part = idx[start:start + step]
            emb = self._run(self.text, [captions[i] for i in part], self.device)
            out[part] = emb.float().to(torch.float16 if self.store == np.float16 else torch.float32).cpu().numpy()
        return out, (~has if not has.all() else None)


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (tuple, list)) else v


# ----------------------------------------------------------------------------- driver side


def _part_stats(part: pa.Table) -> dict[str, dict[str, int]]:
    """A part's statistics for its shard's manifest entry: statuses, decode failures by message,
    and the Ray nodes whose model actors encoded its rows (summed over parts, see shard_parts)."""
    status = part.column("status")
    failed = part.filter(pc.equal(status, FAILED_TO_DECODE))
    nodes = part.column(NODE_COL).to_pylist() if NODE_COL in part.column_names else []
    return {"by_status": dict(Counter(status.to_pylist())),
            "failures": dict(Counter(failed.column("error_message").to_pylist())),
            "nodes": dict(Counter(n for n in nodes if n))}


def _count_success(reader: TableReader, names: list[str]) -> dict[str, int]:
    """Success rows per pairs shard (reads the status column only, a few shards at a time)."""

    def one(name: str) -> int:
        status = reader.read_shard(name, columns=["status"]).column("status")
        return int(pc.sum(pc.equal(status, PAIRS_SUCCESS)).as_py() or 0)

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(one, names)))


def content_config(ec: ExtractConfig, spec: clip.ModelSpec, precision: str) -> dict[str, Any]:
    """What decides the features' values: the config fingerprint of the table. Throughput knobs
    (batch and pool sizes, GPUs, threads) are left out, so resuming with other ones keeps shards."""
    return {
        "model": ec.model,
        "weights": clip.weights_id(ec.model, ec.pretrained, spec.checkpoint_sha256, ec.seed),
        "precision": precision,
        "dtype": ec.dtype,
        "patch_tokens": ec.patch_tokens,
        **({"text_embeddings": True} if ec.text_embeddings else {}),  # absent when off: older tables keep their fingerprint
        "preprocess": {k: _norm(v) for k, v in spec.preprocess_cfg.items()},
        # only when set, so tables written before these settings keep their fingerprint
        **({"patch_encoding": patch_encoding(ec)} if ec.patch_tokens and patch_encoding(ec) != ec.dtype else {}),
        **({"patch_pool": ec.patch_pool} if ec.patch_tokens and ec.patch_pool else {}),
    }


def patch_encoding(ec: ExtractConfig) -> str:
    """The ``lmeye.patch_codec`` encoding this config stores patch tokens with."""
    return patch_codec.BY_DTYPE[ec.patch_dtype or ec.dtype]


def stored_patch_shape(ec: ExtractConfig, spec: clip.ModelSpec) -> Optional[tuple[int, int]]:
    """(T, D) of the stored patch tokens, after ``patch_pool``; None without patch tokens."""
    if not ec.patch_tokens or spec.token_shape is None:
        return None
    try:
        return patch_codec.pooled_shape(tuple(spec.token_shape), ec.patch_pool)
    except ValueError as err:
        raise UserError(f"extract.patch_pool: {ec.model}: {err}") from None


def table_metadata(ec: ExtractConfig, spec: clip.ModelSpec, precision: str) -> dict[str, str]:
    h, w = spec.image_size
    return {
        "model": ec.model,
        "pretrained": ec.pretrained or f"{clip.RANDOM_INIT}, seed {ec.seed})",
        "checkpoint_sha256": spec.checkpoint_sha256,
        "image_size": str(h) if h == w else f"{h}x{w}",
        "dtype": ec.dtype,
        "embed_dim": str(spec.embed_dim),
        "precision": precision,
        "patch_tokens_shape": ",".join(map(str, stored_patch_shape(ec, spec) or ())),
        "patch_encoding": patch_encoding(ec) if ec.patch_tokens else "",
        "patch_pool": str(ec.patch_pool or "") if ec.patch_tokens else "",
    }


def run(cfg: Config) -> StageSummary:
    """Extract CLIP features for every successful pairs row not yet done; returns the summary."""
    t0 = time.time()
    ec = cfg.extract
    out = ec.output
    summary = StageSummary(stage="extract", output=out, rate_unit="images/s")

    pairs = TableReader(ec.input, PAIRS)
    device = "cuda" if ec.num_gpus > 0 else "cpu"
    precision = clip.resolve_precision(ec.precision, device)
    spec = _probe(ec)
    meta = table_metadata(ec, spec, precision)
    schema = features_schema(
        spec.embed_dim, ec.dtype, stored_patch_shape(ec, spec),
        {k: v for k, v in meta.items() if k not in ("patch_tokens_shape", "patch_encoding", "patch_pool")},
        patch_encoding=patch_encoding(ec), patch_pool=ec.patch_pool, text_embeddings=ec.text_embeddings,
    )
    pairs_sha = {n: s.sha256 for n, s in pairs.manifest.shards.items()}
    writer = TableWriter(
        out, FEATURES, config=content_config(ec, spec, precision), input_fingerprint=fingerprint(pairs_sha)
    )
    names = pairs.shard_names
    pending = [n for n in names if not writer.is_done(n, pairs_sha[n])]
    summary.shards_skipped = len(names) - len(pending)
    expected = _count_success(pairs, pending) if pending else {}

    progress = _Progress(sum(expected.values()))
    _extract(cfg, spec, precision, pairs, pending, writer, schema, expected, pairs_sha, progress, summary)
    progress.close()
    remove_temporaries(out)
    if summary.ok:
        writer.finalize(names, stats=_stats(writer.manifest.shards), metadata=meta)
    _summarise(ec, spec, precision, meta, writer, progress, t0, summary)
    return summary


def _probe(ec: ExtractConfig) -> clip.ModelSpec:
    """The model's shapes and preprocessing, checked before Ray starts."""
    try:
        spec = clip.probe_model(ec.model, ec.pretrained, seed=ec.seed, config_dirs=ec.model_config_dirs)
    except clip.ModelError as err:
        raise UserError(str(err)) from None
    if ec.patch_tokens and spec.token_shape is None:
        raise UserError(f"extract.patch_tokens: {ec.model}'s visual tower returns no token features")
    return spec


def _extract(cfg: Config, spec, precision, pairs, pending, writer, schema, expected, pairs_sha, progress,
             summary: StageSummary) -> None:
    """Every pending shard: empty ones recorded here, the rest through model-actor passes, a fresh
    pool after a lost actor. A failure stops the run with ``summary.ok`` False (Ctrl-C raises)."""
    import ray

    ec = cfg.extract
    try:
        for name in pending:
            if expected[name] == 0:  # nothing to extract: an empty shard keeps the one-to-one layout
                writer.record(assemble_shard(ec.output, name, schema, [], row_group_rows=ec.row_group_rows,
                                             inputs=[name], input_fingerprint=pairs_sha[name],
                                             stats={"by_status": {}, "failures": {}, "nodes": {}}))
                summary.shards_done += 1
        work = [n for n in pending if expected[n] > 0]
        if work:
            init_ray(cfg.ray)  # inputs and model checked first: a bad one fails before Ray starts
            summary.notes.append(_threads_note(ec))
        restarts = 0
        while work:
            try:
                summary.shards_done += _one_pass(ec, spec, precision, pairs, work, writer, schema, expected, pairs_sha, progress)
                work = []
            except ray.exceptions.RayActorError as err:
                # A model actor died (OOM kill, node lost...). Ray Data's own actor restarts are off
                # (see _build_dataset): the stage starts a fresh pool over the shards not yet written.
                if restarts >= ec.actor_restarts:
                    raise
                restarts += 1
                left = [n for n in work if not writer.is_done(n, pairs_sha[n])]
                summary.shards_done += len(work) - len(left)
                work = left
                progress.restart([expected[n] for n in work])
                summary.notes.append(f"model actor lost ({_reason(err)[:120]}); restarted the pool for {len(work)} unfinished shard(s)")
    except (KeyboardInterrupt, ray.exceptions.RayError, RuntimeError, OSError, ValueError) as err:
        progress.close()
        if isinstance(err, KeyboardInterrupt):
            remove_temporaries(ec.output)  # the workers' parts of unfinished shards
            raise
        traceback.print_exc(file=sys.stderr)
        summary.ok = False
        summary.notes.append(f"stopped: {_reason(err)}"[:400])


def _summarise(ec: ExtractConfig, spec, precision, meta, writer: TableWriter, progress, t0: float,
               summary: StageSummary) -> None:
    """Counts, failures, timing and the nodes that did the work, from the manifest."""
    shards = writer.manifest.shards.values()
    summary.rows = writer.manifest.num_rows
    summary.counts = dict(sum_counts(info.stats.get("by_status", {}) for info in shards))
    summary.failures = dict(sum_counts(info.stats.get("failures", {}) for info in shards))
    summary.seconds = time.time() - t0
    startup, steady = progress.timing(t0)
    summary.rate = steady
    if startup is not None:
        summary.notes.append(
            f"start-up {startup:.1f}s (Ray, decoding and model load, up to the first batch), then "
            + (f"{steady:.1f} images/s steady over {progress.steady_images} images" if steady else "no more batches")
        )
    nodes = sum_counts(info.stats.get("nodes", {}) for info in shards)
    if nodes:
        summary.notes.append(node_note(nodes, "rows encoded"))
    summary.notes.insert(
        0, f"model {ec.model} ({meta['pretrained']}), {precision}, {ec.dtype} x {spec.embed_dim}"
        + (f", patch tokens {meta['patch_tokens_shape']} {meta['patch_encoding']}" if ec.patch_tokens else "")
        + (f" (grid pooled to {ec.patch_pool}x{ec.patch_pool})" if ec.patch_tokens and ec.patch_pool else "")
    )


def _one_pass(ec, spec, precision, pairs, work, writer, schema, expected, pairs_sha, progress) -> int:
    """Stream one Ray Data pipeline over ``work`` into features shards; returns the shards written.

    The workers write each block's rows as parts and the driver reads only the parts' metadata
    (``lmeye.shard_parts``); a shard whose parts hold all its rows is assembled by a Ray task
    and recorded when it returns. Shards assembled before a failure are recorded; the rest are
    redone by the next pass or run (their parts are scratch in ``_staging``).
    """
    # Assembling is I/O: no CPU reserved, so it never waits behind the pipeline's own tasks.
    assembler = ShardAssembler(
        writer, schema, {n: expected[n] for n in work},
        lambda name: {"inputs": [name], "input_fingerprint": pairs_sha[name]},
        row_group_rows=ec.row_group_rows, num_cpus=0, runtime_env=storage_runtime_env(),
    )
    parts = {"staging": _parts_dir(ec.output), "shard_col": SHARD_COL, "schema": schema, "stats_of": _part_stats}
    try:
        ds = _build_dataset(ec, spec, precision, pairs, work, parts)
        for metadata in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
            progress.update(assembler.feed(metadata))
        return assembler.finish()
    except BaseException:
        assembler.salvage()
        raise


def _parts_dir(output: str) -> str:
    """Where the workers write parts: the features table's scratch folder (removed by the stage)."""
    return output.rstrip("/") + "/" + STAGING + "/parts"


class _Progress:
    """Images done / images to do on stderr (one tqdm line), and the start-up vs steady-state timing."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, desc="extract", unit="img", file=sys.stderr, mininterval=1.0, dynamic_ncols=True,
            disable=total == 0,  # nothing to do (a rerun over finished shards): no bar
            bar_format="{desc}: {n_fmt}/{total_fmt} images {percentage:3.0f}% [{elapsed}<{remaining}, {rate_fmt}]",
        )
        self.first: Optional[float] = None  # when the first batch of results arrived
        self.first_rows = 0
        self.done = 0
        self.last: Optional[float] = None

    def update(self, rows: int) -> None:
        now = time.time()
        if self.first is None:
            self.first, self.first_rows = now, rows
        self.done += rows
        self.last = now
        self.bar.update(rows)

    def restart(self, remaining: list[int]) -> None:
        """A fresh pool redoes unfinished shards: the count goes back to what is really left."""
        self.bar.reset(total=self.bar.total)
        self.bar.update(self.bar.total - sum(remaining))

    @property
    def steady_images(self) -> int:
        return self.done - self.first_rows

    def timing(self, t0: float) -> tuple[Optional[float], Optional[float]]:
        """(seconds from the command's start to the first results, images/s after them)."""
        if self.first is None:
            return None, None
        span = (self.last or self.first) - self.first
        steady = self.steady_images / span if self.steady_images and span > 0 else None
        return self.first - t0, steady

    def close(self) -> None:
        self.bar.close()


def auto_torch_threads(node_cpus: float, actor_num_cpus: float, pool_max: int) -> int:
    """Threads of one CPU model actor when ``extract.torch_threads`` is unset: the node's CPUs shared
    by the model actors that fit on it. The read tasks' CPUs are counted in, on purpose: reading a
    shard is far cheaper than a forward pass, so those cores sit idle most of the time and the model
    (and its decoding, on the same threads) uses them (measured on 2 cores, ViT-B-32, when the tasks
    still decoded: 1.46x the throughput of one thread, bit-identical)."""
    actors = max(1, min(pool_max, int(node_cpus // max(actor_num_cpus, 1e-9))))
    return max(1, int(node_cpus // actors))


def encoder_settings(ec: ExtractConfig, precision: str) -> dict[str, Any]:
    """What a model actor (``Encoder``) is built with; chat and eval build the same one."""
    return {
        "torch_threads": ec.torch_threads or (max(1, int(ec.actor_num_cpus)) if ec.num_gpus > 0 else None),
        "actor_num_cpus": ec.actor_num_cpus,
        "pool_max": ec.pool_max_size or ec.pool_size,
        "num_gpus": ec.num_gpus,
        "precision": precision,
        "model_config_dirs": list(ec.model_config_dirs),
        "weights_cache_dir": ec.weights_cache_dir,
        "patch_tokens": ec.patch_tokens,
        "text_embeddings": ec.text_embeddings,
        "dtype": ec.dtype,
        "patch_encoding": patch_encoding(ec),
        "patch_pool": ec.patch_pool,
        "debug_delay_s": ec.debug_delay_s,
        "batch_size": ec.batch_size,
    }


def _this_node() -> Optional[str]:
    """This process's Ray node id; None outside Ray (benchmarks call the encoder directly)."""
    try:
        import ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _node_cpus() -> float:
    """CPUs Ray gives this worker's node (the node the calling actor runs on)."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == me:
            return float(node.get("Resources", {}).get("CPU", 1))
    return float(os.cpu_count() or 1)


def _threads_note(ec: ExtractConfig) -> str:
    if ec.num_gpus > 0:
        return f"torch threads per model actor: {ec.torch_threads or max(1, int(ec.actor_num_cpus))} (GPU)"
    if ec.torch_threads:
        return f"torch threads per model actor: {ec.torch_threads} (extract.torch_threads)"
    import ray

    cpus = sorted({float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")})
    pool = ec.pool_max_size or ec.pool_size
    per = sorted({auto_torch_threads(c, ec.actor_num_cpus, pool) for c in cpus}) or [1]
    rule = "the CPUs of its node / the model actors that fit there (the read tasks are light and leave them to the model)"
    return f"torch threads per model actor: {'-'.join(map(str, (per[0], per[-1]) if len(per) > 1 else per))} ({rule}; set extract.torch_threads to override)"


def _stats(shards: dict[str, ShardInfo]) -> dict[str, Any]:
    return {key: dict(sum_counts(info.stats.get(key, {}) for info in shards.values())) for key in ("by_status", "failures")}


def _build_dataset(ec: ExtractConfig, spec: clip.ModelSpec, precision: str, pairs: TableReader, work: list[str],
                   parts: dict[str, Any]):
    """Read tasks, then the model actors (decode, forward), which write their output rows as shard parts
    (``parts``: ``write_parts``'s arguments) and pass on only the parts' metadata."""
    import ray

    items = [{"shard": n, "path": pairs.file(n)} for n in work]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # Ray Data counts blocks against a guessed total; run() shows images
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_shard,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"rows": ec.decode_batch_rows, "captions": ec.text_embeddings},
        num_cpus=ec.decode_num_cpus,
        # Reserving memory for the read tasks also gives them remote args unlike the actors',
        # which keeps Ray Data from fusing reading into the model actors: reading (storage I/O)
        # stays in CPU tasks that run beside the model, not inside its actor.
        memory=ec.decode_memory_mb * 1024 * 1024,
        runtime_env=storage_runtime_env(),  # both read from the table's storage
    )
    if ec.pool_max_size:
        compute = ray.data.ActorPoolStrategy(min_size=ec.pool_size, max_size=max(ec.pool_size, ec.pool_max_size))
    else:
        compute = ray.data.ActorPoolStrategy(size=ec.pool_size)
    settings = encoder_settings(ec, precision) | {"parts": parts}
    # Ray Data passes an actor's constructor arguments through the object store, where Ray cannot
    # restore them for a restart (ray-project/ray#53727: "constructor arguments in the object store and
    # max_restarts > 0 ... restart will fail"). So Ray's own actor restarts are off and the stage restarts
    # the pool itself (run: a fresh pipeline over the unfinished shards, extract.actor_restarts times).
    with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60: it goes through the deprecated **ray_remote_args
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            Encoder,
            fn_constructor_kwargs={"spec": spec.to_dict(), "settings": settings},
            batch_size=None,  # whole blocks; the actor runs them in chunks of batch_size
            batch_format="pyarrow",
            compute=compute,
            num_cpus=ec.actor_num_cpus,
            num_gpus=ec.num_gpus if ec.num_gpus > 0 else None,
            resources=dict(ec.actor_resources) or None,
            max_restarts=0,
            runtime_env=storage_runtime_env(),
        )
