"""Rows of the instruct stage: per-source accounting, and the source runners that read each
configured source and turn its records into spilled rows.

``RowBuilder`` applies a source's weight and cap and spills rows in chunks; ``_run_captions_table``
and ``_run_file_source`` drive one source each (the readers and parsers are in
``pipelines.instruct_sources``).
"""

from __future__ import annotations

import bisect
import hashlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmeye.config.instruct import DEFAULT_TASK, InstructConfig
from lmeye.errors import UserError
from lmeye.tables import Manifest
from pipelines.instruct_partition import MASK64, SPILL_SCHEMA, Placement, Spill, _seed64, _uid_ints
from pipelines.instruct_sources import (
    UID_RE,
    ImageIndex,
    Malformed,
    Parsed,
    Reject,
    fill,
    parse_caption_record,
    parse_llava,
    parse_qa,
    read_json_source,
    resolve,
)
from schemas.instructions import CONVERSATION, ROLE_ASSISTANT, ROLE_USER, TURN
from schemas.pairs import SUCCESS

OUTCOMES = ("kept", "duplicate", "no_features", "sampled_out", "over_cap", "malformed")


# ---------------------------------------------------------------------------------------------
# Per-source accounting


@dataclass
class SourceStats:
    kind: str
    input: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first malformed records, for the summary

    def accounted(self) -> int:
        return sum(self.outcomes.values()) + sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "input": self.input}
        d.update({k: int(self.outcomes.get(k, 0)) for k in OUTCOMES})
        d["rejected"] = dict(sorted(self.rejected.items()))
        if self.examples:
            d["malformed_examples"] = list(self.examples)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceStats":
        s = cls(kind=d["kind"], input=d["input"])
        s.outcomes.update({k: d.get(k, 0) for k in OUTCOMES})
        s.rejected.update(d.get("rejected", {}))
        s.examples = list(d.get("malformed_examples", []))
        return s


class _Progress:
    def __init__(self, every: float = 10.0):
        self.every, self.last, self.start = every, time.time(), time.time()

    def tick(self, what: Callable[[], str]) -> None:
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            print(f"[instruct] {now - self.start:7.0f}s  {what()}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Building rows


class RowBuilder:
    """Turns (uid, task, turns) of one source into spilled rows, applying weight and cap."""

    def __init__(self, spill: Spill, placement: Placement, src: int, name: str, weight: float,
                 cap: Optional[int], seed: int, stats: SourceStats, chunk_rows: int):
        self.spill, self.placement, self.src, self.stats = spill, placement, src, stats
        self.name_bytes = name.encode() + b"\x00"
        self.weight, self.cap, self.chunk_rows = weight, cap, chunk_rows
        self.sample_mix = _seed64("weight", seed, name)
        self.accepted = 0
        self._reset()

    def _reset(self) -> None:
        self.uids: list[str] = []
        self.tasks: list[str] = []
        self.sids: list[str] = []
        self.keys: list[int] = []
        self.roles: list[str] = []
        self.contents: list[str] = []
        self.offsets: list[int] = [0]

    def add(self, uid: str, task: str, turns: list[tuple[str, str]]) -> None:
        if len(turns) == 2:  # the common case, without the generator
            text = turns[0][0] + "\x1f" + turns[0][1] + "\x1e" + turns[1][0] + "\x1f" + turns[1][1]
        else:
            text = "\x1e".join(r + "\x1f" + c for r, c in turns)
        kd = hashlib.blake2b((uid + "\x00" + text).encode(), digest_size=8).digest()
        sd = hashlib.blake2b(self.name_bytes + kd, digest_size=8).digest()
        if self.weight < 1.0:
            x = (int.from_bytes(sd, "big") ^ self.sample_mix) * 0x9E3779B97F4A7C15 & MASK64
            if (x >> 11) / 9007199254740992.0 >= self.weight:
                self.stats.outcomes["sampled_out"] += 1
                return
        if self.cap is not None and self.accepted >= self.cap:
            self.stats.outcomes["over_cap"] += 1
            return
        self.accepted += 1
        self.uids.append(uid)
        self.tasks.append(task)
        self.sids.append(sd.hex())
        self.keys.append(int.from_bytes(kd, "big", signed=True))
        for r, c in turns:
            self.roles.append(r)
            self.contents.append(c)
        self.offsets.append(len(self.roles))
        if len(self.uids) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        n = len(self.uids)
        if n == 0:
            return
        part, val = self.placement.place(_uid_ints(self.uids))
        turns = pa.StructArray.from_arrays(
            [pa.array(self.roles, pa.string()), pa.array(self.contents, pa.string())], fields=list(TURN)
        )
        conv = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), turns, type=CONVERSATION)
        table = pa.Table.from_arrays(
            [
                pa.array(self.uids, pa.string()),
                pa.array(np.full(n, self.src, dtype=np.int16)),
                pa.array(self.tasks, pa.string()),
                pa.array(self.sids, pa.string()),
                pa.array(self.keys, pa.int64()),
                pa.array(val),
                conv,
            ],
            schema=SPILL_SCHEMA,
        )
        self.spill.write(table, part)
        self._reset()


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Ctx:
    cfg: InstructConfig
    pairs: str
    templates: Any  # dict task -> TaskTemplates, loaded on first use
    indexes: dict[tuple[str, int], ImageIndex] = field(default_factory=dict)

    def index(self, rule: str, components: int) -> Optional[ImageIndex]:
        if rule in ("url", "uid"):
            return None
        key = (rule, components if rule == "path" else 0)
        if key not in self.indexes:
            self.indexes[key] = ImageIndex(self.pairs, rule, components)
        return self.indexes[key]


class _CaptionTasks:
    """Chooses a task (by weight), a prompt and a response per caption, by a seeded hash."""

    def __init__(self, templates: dict, weights: dict[str, float], seed: int, task_label: Optional[str]):
        names = [t for t, w in weights.items() if w > 0]
        total = sum(weights[t] for t in names)
        self.cum = np.cumsum([weights[t] / total for t in names]).tolist()
        self.names = names
        self.tpl = [templates[t] for t in names]
        self.seed = str(seed).encode() + b"\x00"
        self.label = task_label

    def make(self, uid: str, caption: str) -> tuple[str, list[tuple[str, str]]]:
        h = int.from_bytes(hashlib.blake2b(self.seed + (uid + caption).encode(), digest_size=8).digest(), "big")
        i = min(bisect.bisect_right(self.cum, (h >> 40) / 16777216.0), len(self.cum) - 1)
        t = self.tpl[i]
        prompt = t.prompts[(h & 0xFFFFF) % len(t.prompts)]
        response = fill(t.responses[((h >> 20) & 0xFFFFF) % len(t.responses)], caption)
        return self.label or self.names[i], [(ROLE_USER, prompt), (ROLE_ASSISTANT, response)]


def _bad(ctx: _Ctx, stats: SourceStats, file: str, where: str, err: Malformed) -> None:
    if ctx.cfg.on_bad_record == "error":
        raise UserError(f"{file}: {where}: {err} (set instruct.on_bad_record: skip to skip and count such records)")
    stats.outcomes["malformed"] += 1
    if len(stats.examples) < 3:
        stats.examples.append(f"{file}: {where}: {err}")


def _run_captions_table(ctx: _Ctx, spec: Any, table: str, rows: RowBuilder, stats: SourceStats, progress: _Progress) -> None:
    manifest = Manifest.load(table)
    if manifest is None:
        raise FileNotFoundError(f"instruct source '{rows.name_bytes[:-1].decode()}': no pairs table at {table}; run `lmeye download` first")
    tasks = _CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)
    fs, root = fsspec.core.url_to_fs(table)
    rej = stats.rejected
    for name in sorted(manifest.shards):
        with fs.open(root.rstrip("/") + "/" + name) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=["uid", "caption", "status"], batch_size=ctx.cfg.chunk_rows):
                d = batch.to_pydict()
                stats.input += batch.num_rows
                for uid, caption, status in zip(d["uid"], d["caption"], d["status"]):
                    if status != SUCCESS:
                        rej["image_failed"] += 1
                    elif caption is None or not caption.strip():
                        rej["no_caption"] += 1
                    elif not UID_RE.match(uid):
                        rej["bad_uid"] += 1
                    else:
                        task, turns = tasks.make(uid, caption.strip())
                        rows.add(uid, task, turns)
                progress.tick(lambda: f"{stats.input} caption rows read")


def _run_file_source(ctx: _Ctx, spec: Any, rows: RowBuilder, stats: SourceStats, progress: _Progress) -> None:
    kind = spec.kind
    index = ctx.index(spec.image_key, spec.path_components)
    task = spec.task or DEFAULT_TASK.get(kind)
    caption_tasks = None
    if kind == "captions":
        caption_tasks = _CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)
    try:
        for file, where, rec in read_json_source(spec.path):
            stats.input += 1
            try:
                if isinstance(rec, Malformed):
                    raise rec
                if kind == "vqa":
                    out = parse_qa(rec, spec.image_field, spec.question_field, spec.answer_field)
                elif kind == "lmeyemid":
                    out = parse_qa(rec, spec.image_field, spec.question_field, spec.answer_field)
                elif kind == "llava":
                    out = parse_llava(rec, spec.image_field, spec.conversations_field)
                else:
                    out = parse_caption_record(rec, spec.image_field, spec.caption_field)
            except Malformed as err:
                _bad(ctx, stats, file, where, err)
                continue
            if isinstance(out, Reject):
                stats.rejected[out.reason] += 1
                continue
            ref = out.image if isinstance(out, Parsed) else out[0]
            uid = resolve(ref, spec.image_key, index, spec.path_components, spec.url_prefix)
            if isinstance(uid, Reject):
                stats.rejected[uid.reason] += 1
                continue
            if caption_tasks is not None:
                t, turns = caption_tasks.make(uid, out[1].strip())
                rows.add(uid, t, turns)
            else:
                rows.add(uid, task, out.turns)
            if stats.input % 4096 == 0:
                progress.tick(lambda: f"{spec.path}: {stats.input} records read")
    except Malformed as err:  # the file as a whole is not a JSON list: never skippable
        raise UserError(str(err)) from None
