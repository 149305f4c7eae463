"""Rows of the instruct stage: per-source accounting, and the source runners that read each
configured source and turn its records into spilled rows.

``RowBuilder`` applies a source's weight and cap and spills rows in chunks;
``run_captions_table`` and ``run_file_source`` drive one source each (the readers and parsers
are in ``jsonio`` and ``records``, the caption tasks in ``captions``).
"""

from __future__ import annotations

import hashlib
import posixpath
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from lmeye.config.instruct import DEFAULT_TASK, InstructConfig
from lmeye.errors import UserError
from lmeye.spill import Spill
from lmeye.tables import TableReader
from pipelines.instruct.captions import CaptionTasks
from pipelines.instruct.formats import NEEDS_POOL, AnswerPool, Formatter
from pipelines.instruct.images import join_key, resolve
from pipelines.instruct.inputs import file_bytes
from pipelines.instruct.join import PairsIndex, Resolver, partition_count
from pipelines.instruct.jsonio import Malformed, read_json_source
from pipelines.instruct.partition import MASK64, SPILL_SCHEMA, Placement, seed64, uid_keys
from pipelines.instruct.records import (
    TEXT_ONLY,
    Parsed,
    Reject,
    load_vqa_answers,
    parse_caption_record,
    parse_llava,
    parse_qa,
    with_vqa_answer,
)
from schemas.instructions import CONVERSATION, TURN
from schemas.pairs import CAPTION, STATUS, SUCCESS, UID as PAIRS_UID

OUTCOMES = ("kept", "duplicate", "no_features", "curated_out", "sampled_out", "over_cap", "malformed")


# ---------------------------------------------------------------------------------------------
# Per-source accounting


@dataclass
class SourceStats:
    """``input = sum(outcomes) + sum(rejected)`` per record; ``dropped_turns`` counts the
    question/answer pairs left out of records that were kept (not records)."""

    kind: str
    input: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    dropped_turns: Counter = field(default_factory=Counter)
    text_only: int = 0  # records kept without an image (null uid), before dedup
    examples: list[str] = field(default_factory=list)  # first malformed records, for the summary

    def accounted(self) -> int:
        return sum(self.outcomes.values()) + sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "input": self.input}
        d.update({k: int(self.outcomes.get(k, 0)) for k in OUTCOMES})
        d["rejected"] = dict(sorted(self.rejected.items()))
        d["dropped_turns"] = dict(sorted(self.dropped_turns.items()))
        d["text_only"] = self.text_only
        if self.examples:
            d["malformed_examples"] = list(self.examples)
        return d


class Progress:
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
    """Turns (uid, task, turns) of one source into spilled rows, applying weight and cap.

    ``sample_id`` hashes the source, the uid, the conversation and the record's position in
    its file, so identical records kept with ``dedupe: false`` still get distinct ids."""

    def __init__(self, spill: Spill, placement: Placement, src: int, name: str, weight: float,
                 cap: Optional[int], seed: int, stats: SourceStats, chunk_rows: int):
        self.spill, self.placement, self.src, self.stats = spill, placement, src, stats
        self.name_bytes = name.encode() + b"\x00"
        self.weight, self.cap, self.chunk_rows = weight, cap, chunk_rows
        self.sample_mix = seed64("weight", seed, name)
        self.accepted = 0
        self._reset()

    def _reset(self) -> None:
        self.uids: list[Optional[str]] = []
        self.tasks: list[str] = []
        self.sids: list[str] = []
        self.keys: list[int] = []
        self.source_ids: list[Optional[str]] = []
        self.roles: list[str] = []
        self.contents: list[str] = []
        self.offsets: list[int] = [0]

    def add(self, uid: Optional[str], task: str, turns: list[tuple[str, str]], source_id: Optional[str] = None,
            position: str = "") -> None:
        if len(turns) == 2:  # the common case, without the generator
            text = turns[0][0] + "\x1f" + turns[0][1] + "\x1e" + turns[1][0] + "\x1f" + turns[1][1]
        else:
            text = "\x1e".join(r + "\x1f" + c for r, c in turns)
        kd = hashlib.blake2b(((uid or "") + "\x00" + text).encode(), digest_size=8).digest()
        sd = hashlib.blake2b(self.name_bytes + kd + position.encode(), digest_size=8).digest()
        if self.weight < 1.0:
            x = (int.from_bytes(sd, "big") ^ self.sample_mix) * 0x9E3779B97F4A7C15 & MASK64
            if (x >> 11) / 9007199254740992.0 >= self.weight:
                self.stats.outcomes["sampled_out"] += 1
                return
        if self.cap is not None and self.accepted >= self.cap:
            self.stats.outcomes["over_cap"] += 1
            return
        self.accepted += 1
        self.stats.text_only += uid is None
        self.uids.append(uid)
        self.tasks.append(task)
        self.sids.append(sd.hex())
        self.keys.append(int.from_bytes(kd, "big", signed=True))
        self.source_ids.append(source_id)
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
        uids = pa.array(self.uids, pa.string())
        keys = np.array(self.keys, dtype=np.int64)
        place, valid = uid_keys(uids)
        # a text-only row has no image to keep on one side: it is placed by its sample key
        place = np.where(valid, place, keys.view(np.uint64))
        part, val = self.placement.place(place)
        turns = pa.StructArray.from_arrays(
            [pa.array(self.roles, pa.string()), pa.array(self.contents, pa.string())], fields=list(TURN)
        )
        conv = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), turns, type=CONVERSATION)
        table = pa.Table.from_arrays(
            [uids, pa.array(np.full(n, self.src, dtype=np.int16)), pa.array(self.tasks, pa.string()),
             pa.array(self.sids, pa.string()), pa.array(keys), pa.array(val), conv,
             pa.array(self.source_ids, pa.string())],
            schema=SPILL_SCHEMA,
        )
        self.spill.write(table, part)
        self._reset()


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceContext:
    """What every source runner needs: the config, the pairs table (opened once, on first use),
    the templates (loaded on first use), and a folder for the join's spill files."""

    cfg: InstructConfig
    pairs: Callable[[], TableReader]
    templates: Callable[[list[str]], dict]
    spill_dir: str
    indexes: dict[tuple[str, int, int], PairsIndex] = field(default_factory=dict)
    resolvers: int = 0  # names each source's join files

    def resolver(self, spec: Any) -> Optional[Resolver]:
        """The partitioned join of a source whose image_key needs the pairs table; None for url
        and uid, which need none. The pairs side is spilled once per rule and partition count."""
        rule = spec.image_key
        if rule in ("url", "uid"):
            return None
        pairs = self.pairs()
        partitions = partition_count(pairs.num_rows, file_bytes(spec.path), self.cfg.partition_mb)
        key = (rule, spec.path_components if rule == "path" else 0, partitions)
        if key not in self.indexes:
            self.indexes[key] = PairsIndex(pairs, rule, key[1], self.spill_dir, partitions, self.cfg.chunk_rows)
        self.resolvers += 1
        return Resolver(self.indexes[key], self.spill_dir, f"source{self.resolvers}", self.cfg.chunk_rows)


def _bad(ctx: SourceContext, stats: SourceStats, file: str, where: str, err: Malformed) -> None:
    if ctx.cfg.on_bad_record == "error":
        raise UserError(f"{file}: {where}: {err} (set instruct.on_bad_record: skip to skip and count such records)")
    stats.outcomes["malformed"] += 1
    if len(stats.examples) < 3:
        stats.examples.append(f"{file}: {where}: {err}")


def run_captions_table(ctx: SourceContext, spec: Any, table: TableReader, rows: RowBuilder, stats: SourceStats,
                       progress: Progress) -> None:
    tasks = CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)
    rej = stats.rejected
    for batch in table.iter_batches(columns=[PAIRS_UID, CAPTION, STATUS], batch_size=ctx.cfg.chunk_rows):
        d = batch.to_pydict()
        stats.input += batch.num_rows
        valid = uid_keys(batch.column(PAIRS_UID))[1]
        for uid, caption, status, ok in zip(d[PAIRS_UID], d[CAPTION], d[STATUS], valid.tolist()):
            if status != SUCCESS:
                rej["image_failed"] += 1
            elif caption is None or not caption.strip():
                rej["no_caption"] += 1
            elif not ok:
                rej["bad_uid"] += 1
            else:
                made = tasks.make(uid, caption.strip())
                if made is None:
                    rej["no_grounded_fact"] += 1
                else:
                    rows.add(uid, made[0], made[1])
        progress.tick(lambda: f"{stats.input} caption rows read")


def _position(spec: Any, file: str, where: str) -> str:
    """``<file>:<record N | line N>``, the file relative to the source path when it is a folder."""
    base = spec.path.rstrip("/")
    rel = file[len(base) + 1:] if file.startswith(base + "/") else posixpath.basename(file)
    return f"{rel}:{where}"


def _parse(spec: Any, rec: Any, answers: Optional[dict] = None) -> Parsed | Reject | tuple[Any, str]:
    kind = spec.kind
    if answers is not None:  # VQAv2 as released: the answer is in the annotations file
        rec = with_vqa_answer(rec, answers, spec.answer_field)
        if isinstance(rec, Reject):
            return rec
    if kind in ("vqa", "lmeyemid"):
        return parse_qa(rec, spec.image_field, spec.question_field, spec.answer_field, spec.id_field)
    if kind == "llava":
        return parse_llava(rec, spec.image_field, spec.conversations_field, spec.id_field, spec.text_only)
    return parse_caption_record(rec, spec.image_field, spec.caption_field)


def _answer_pool(spec: Any, answers: Optional[dict]) -> AnswerPool:
    """A first pass over a question/answer source: every well-formed record's (question, answer)."""

    def pairs():
        for _, _, rec in read_json_source(spec.path):
            if isinstance(rec, Malformed):
                continue
            try:
                out = _parse(spec, rec, answers)
            except Malformed:
                continue
            if isinstance(out, Parsed):
                yield out.turns[0][1], out.turns[1][1]

    return AnswerPool(pairs(), spec.type_words)


def formatter_of(spec: Any, seed: int, answers: Optional[dict] = None) -> Optional[Formatter]:
    """The source's answer formats (None: every record as it is)."""
    formats = getattr(spec, "formats", None)
    if not formats or set(f for f, w in formats.items() if w > 0) == {"plain"}:
        return None
    pool = _answer_pool(spec, answers) if any(formats.get(f, 0) > 0 for f in NEEDS_POOL) else None
    return Formatter(formats, pool, seed, spec.name or spec.kind, spec.distractors)


class _Emitter:
    """Turns one resolved record of a file source into rows: caption tasks, answer formats or
    the conversation as it is."""

    def __init__(self, ctx: SourceContext, spec: Any, rows: RowBuilder, stats: SourceStats,
                 formatter: Optional[Formatter]):
        self.spec, self.rows, self.stats, self.formatter = spec, rows, stats, formatter
        self.task = spec.task or DEFAULT_TASK.get(spec.kind)
        self.text_task = getattr(spec, "text_only_task", None)
        self.caption_tasks = None
        if spec.kind == "captions":
            self.caption_tasks = CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)

    def emit(self, uid: Optional[str], out: Any, file: str, where: str) -> None:
        position = _position(self.spec, file, where)
        if self.caption_tasks is not None:
            made = self.caption_tasks.make(uid, out[1].strip())
            if made is None:
                self.stats.rejected["no_grounded_fact"] += 1
            else:
                self.rows.add(uid, made[0], made[1], position, position)
        elif self.formatter is not None:  # one question, one answer: asked in one of the source's formats
            made_task, turns = self.formatter.apply(out.turns[0][1], out.turns[1][1], self.task, position,
                                                    (out.turns[0][0], out.turns[1][0]))
            self.rows.add(uid, made_task, turns, out.source_id or position, position)
        else:
            self.stats.dropped_turns.update(out.dropped)
            self.rows.add(uid, self.text_task if uid is None else self.task, out.turns, out.source_id or position, position)


def run_file_source(ctx: SourceContext, spec: Any, rows: RowBuilder, stats: SourceStats, progress: Progress) -> None:
    """Read a file source record by record. A record whose image needs the pairs table waits in
    the partitioned join (``join.Resolver``) and is built, in input order, once it is resolved."""
    resolver = ctx.resolver(spec)
    try:
        answers = load_vqa_answers(spec.answers) if getattr(spec, "answers", None) else None
        emitter = _Emitter(ctx, spec, rows, stats, formatter_of(spec, ctx.cfg.seed, answers))
        for file, where, rec in read_json_source(spec.path):
            stats.input += 1
            try:
                if isinstance(rec, Malformed):
                    raise rec
                out = _parse(spec, rec, answers)
                if isinstance(out, Reject):
                    stats.rejected[out.reason] += 1
                    continue
                ref = out.image if isinstance(out, Parsed) else out[0]
                if resolver is not None:
                    key = None if ref is TEXT_ONLY else join_key(ref, spec.image_key, spec.path_components)
                else:
                    key = None if ref is TEXT_ONLY else resolve(ref, spec.image_key, spec.url_prefix)
            except Malformed as err:
                _bad(ctx, stats, file, where, err)
                continue
            if isinstance(key, Reject):
                stats.rejected[key.reason] += 1
            elif resolver is not None:
                resolver.add(stats.input, key, file, where, rec)
            else:
                emitter.emit(key, out, file, where)  # url and uid rules: the key is the uid
            if stats.input % 4096 == 0:
                progress.tick(lambda: f"{spec.path}: {stats.input} records read")
        if resolver is not None:
            for _, r in resolver.resolved():
                if r.reason is not None:
                    stats.rejected[r.reason] += 1
                else:  # parsed again from the record's text: the same result as the first time
                    emitter.emit(r.uid, _parse(spec, r.rec, answers), r.file, r.where)
    except Malformed as err:  # the file as a whole is not a JSON list: never skippable
        raise UserError(str(err)) from None
    _check_mostly_well_formed(ctx, spec, stats)


def _check_mostly_well_formed(ctx: SourceContext, spec: Any, stats: SourceStats) -> None:
    """A source whose records are mostly malformed does not fit its config (fields, image_key):
    one error, not a table without its rows and a count in the summary."""
    bad = stats.outcomes["malformed"]
    if stats.input and bad > ctx.cfg.max_malformed_fraction * stats.input:
        first = f"; the first: {stats.examples[0]}" if stats.examples else ""
        raise UserError(f"instruct source '{spec.name}': {bad} of {stats.input} records are malformed "
                        f"(more than instruct.max_malformed_fraction {ctx.cfg.max_malformed_fraction}){first}")
