"""Readers for the instruct stage: streaming JSON, record parsers per source kind, image
reference -> uid mapping, and the caption templates.

Nothing here holds a whole file: ``.json`` lists are decoded one element at a time and
``.jsonl`` one line at a time, so a multi-GB LMEyeMID or LLaVA file streams.

A parser turns one decoded record into ``Parsed`` (an image reference and the turns), a
``Reject`` (a record that is well-formed but unusable, counted by reason), or raises
``Malformed`` (not the expected shape: the config's ``on_bad_record`` decides whether that is
an error naming the file and the record, or a counted skip).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

import fsspec
import pyarrow.parquet as pq
import yaml

from lmeye.tables import Manifest
from lmeye.uid import UID_PATTERN, uid_for
from schemas.instructions import ROLE_ASSISTANT, ROLE_USER
from schemas.pairs import SUCCESS

IMAGE_TOKEN_RE = re.compile(r"[ \t]*<image>[ \t]*\n?")
UID_RE = re.compile(UID_PATTERN)
COCO_ID_RE = re.compile(r"(\d+)(?:\.[A-Za-z0-9]+)?$")

ROLE_MAP = {"human": ROLE_USER, "user": ROLE_USER, "gpt": ROLE_ASSISTANT, "assistant": ROLE_ASSISTANT}


class Malformed(Exception):
    """A record that is not the expected shape; the message says what is wrong with it."""


@dataclass(frozen=True)
class Reject:
    reason: str


@dataclass
class Parsed:
    image: Any  # the image reference as the file has it (str or int), or a uid for table sources
    turns: list[tuple[str, str]]  # (role, content), validated
    task: Optional[str] = None


# ---------------------------------------------------------------------------------------------
# Files


def list_files(path: str) -> list[str]:
    """A file, a folder (its *.json / *.jsonl, .gz too), or a glob; sorted, with protocol."""
    fs, root = fsspec.core.url_to_fs(path)
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if proto in ("file", "local") else f"{proto}://"
    if any(c in root for c in "*?["):
        found = sorted(fs.glob(root))
    elif fs.isdir(root):
        found = sorted(
            f for f in fs.find(root) if re.search(r"\.jsonl?(\.gz)?$", f) and not f.rsplit("/", 1)[-1].startswith(".")
        )
    elif fs.exists(root):
        found = [root]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not found:
        raise FileNotFoundError(f"{path}: no .json or .jsonl files there")
    return [prefix + f for f in found]


def file_signature(path: str) -> dict[str, Any]:
    """Size and modification stamp, for the input fingerprint."""
    fs, root = fsspec.core.url_to_fs(path)
    info = fs.info(root)
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or info.get("updated")
    return {"path": path, "size": info.get("size"), "stamp": str(stamp)}


def _is_jsonl(path: str) -> bool:
    return re.search(r"\.jsonl(\.gz)?$", path) is not None


def iter_records(path: str, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """``(where, record_or_Malformed)`` for every record of a .json list or a .jsonl file.

    ``where`` names the record for messages: ``"line 7"`` (1-based) or ``"record 3"`` (0-based
    index into the list). Blank lines of a .jsonl file are not records.
    """
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        if _is_jsonl(path):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"line {n}", Malformed(f"not valid JSON ({err.msg} at column {err.colno})")
        else:
            yield from _iter_json_array(f, path, chunk_chars)


_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{},]')
_WS = " \t\r\n"


class _ArrayError(Exception):
    """The file as a whole is not a JSON list (not a record-level problem)."""


def _find_element_end(buf: str, pos: int) -> Optional[int]:
    """End (exclusive) of the JSON element starting at ``pos`` by bracket depth, or None if the
    buffer ends first. Used only after the decoder rejected the element, to skip it."""
    depth = 0
    for m in _TOKEN_RE.finditer(buf, pos):
        tok = m.group()
        if tok == '"':  # an unterminated string: the element continues past the buffer
            return None
        if tok[0] == '"':
            continue
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            if depth == 0:
                return m.start()  # the list's own closing bracket ends a scalar element
            depth -= 1
            if depth == 0:
                return m.end()
        elif tok == "," and depth == 0:
            return m.start()
    return None


def _iter_json_array(f, path: str, chunk_chars: int) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        data = f.read(chunk_chars)
        if not data:
            eof = True
            return False
        buf = buf[pos:] + data
        pos = 0
        return True

    def skip_ws() -> Optional[str]:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return None

    first = skip_ws()
    if first != "[":
        got = "an empty file" if first is None else f"'{first}'"
        raise _ArrayError(f"{path}: expected a JSON list of records ('['), found {got}; use .jsonl for one record per line")
    pos += 1
    index = 0
    expect_value = True  # after '[' or ','
    while True:
        c = skip_ws()
        if c is None:
            raise _ArrayError(f"{path}: the JSON list is not closed (file ends after record {index - 1})")
        if c == "]" and (index == 0 or not expect_value):
            return
        if not expect_value:
            if c != ",":
                raise _ArrayError(f"{path}: record {index - 1}: expected ',' or ']' after it, found '{c}'")
            pos += 1
            expect_value = True
            continue
        # decode one element; grow the buffer while it may be incomplete
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof and isinstance(obj, (int, float)):
                    raise json.JSONDecodeError("number may continue", buf, end)  # read on: 12|34
                yield f"record {index}", obj
                pos = end
                break
            except json.JSONDecodeError as err:
                end = _find_element_end(buf, pos)
                if end is not None and (end < len(buf) or eof):
                    text = buf[pos:end].strip()
                    yield f"record {index}", Malformed(f"not valid JSON ({err.msg}: {text[:60]!r})")
                    pos = end
                    break
                if not more():
                    yield f"record {index}", Malformed(f"not valid JSON ({err.msg}); the file ends inside it")
                    return
        index += 1
        expect_value = False


def read_json_source(path: str) -> Iterator[tuple[str, str, Any]]:
    """``(file, where, record_or_Malformed)`` over every file of a source path."""
    for file in list_files(path):
        try:
            for where, rec in iter_records(file):
                yield file, where, rec
        except _ArrayError as err:
            raise Malformed(str(err)) from None
        except UnicodeDecodeError as err:
            raise Malformed(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None


# ---------------------------------------------------------------------------------------------
# Record parsers


def strip_image_token(text: str) -> str:
    return IMAGE_TOKEN_RE.sub("", text).strip() if "<image>" in text else text.strip()


def _field(rec: Any, name: str, types: tuple[type, ...], what: str) -> Any:
    if not isinstance(rec, dict):
        raise Malformed(f"not a JSON object (got {type(rec).__name__})")
    if name not in rec:
        raise Malformed(f"missing '{name}' ({what})")
    value = rec[name]
    if value is not None and not isinstance(value, types):
        raise Malformed(f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
    return value


def _image_ref(value: Any) -> Any:
    """A single image reference, or a Reject. Lists of one are unwrapped; ints stay ints."""
    if isinstance(value, list):
        if len(value) > 1:
            return Reject("multiple_images")
        value = value[0] if value else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return Reject("no_image")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Malformed(f"image reference must be a string or an integer, got {type(value).__name__}")
    return value.strip() if isinstance(value, str) else value


def _answer(value: Any, name: str) -> str:
    if isinstance(value, bool):
        raise Malformed(f"'{name}' must be a string, got bool")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # VQA v2 style: several annotators' answers, the most frequent wins
        answers = []
        for a in value:
            a = a.get("answer") if isinstance(a, dict) else a
            if isinstance(a, str) and a.strip():
                answers.append(a.strip())
        if not answers:
            return ""
        counts = Counter(answers)
        best = max(counts.values())
        return next(a for a in answers if counts[a] == best)
    raise Malformed(f"'{name}' must be a string or a list of answers, got {type(value).__name__}")


def check_turns(turns: list[tuple[str, str]]) -> Optional[Reject]:
    """The conversation rules; None when the conversation is fine."""
    roles = [r for r, _ in turns]
    if ROLE_USER not in roles:
        return Reject("no_user_turn")
    if ROLE_ASSISTANT not in roles:
        return Reject("no_answer")
    if any(not c for r, c in turns if r == ROLE_ASSISTANT):
        return Reject("empty_answer")
    if any(not c for r, c in turns if r == ROLE_USER):
        return Reject("empty_question")
    if roles[0] != ROLE_USER or any(a == b for a, b in zip(roles, roles[1:])):
        return Reject("turns_not_alternating")
    if roles[-1] != ROLE_ASSISTANT:
        return Reject("unanswered_question")
    return None


def parse_qa(rec: Any, image_field: str, question_field: str, answer_field: str) -> Parsed | Reject:
    """VQA and LMEyeMID records: one question, one answer."""
    image = _field(rec, image_field, (str, int, list), "the image reference")
    question = _field(rec, question_field, (str,), "the question")
    answer = _field(rec, answer_field, (str, int, float, list), "the answer")
    ref = _image_ref(image)
    if isinstance(ref, Reject):
        return ref
    q = strip_image_token(question or "")
    a = _answer(answer, answer_field).strip() if answer is not None else ""
    if not a:
        return Reject("empty_answer")
    if not q:
        return Reject("empty_question")
    return Parsed(ref, [(ROLE_USER, q), (ROLE_ASSISTANT, a)])


def parse_llava(rec: Any, image_field: str, conversations_field: str) -> Parsed | Reject:
    convs = _field(rec, conversations_field, (list,), "the conversation")
    if convs is None:
        raise Malformed(f"'{conversations_field}' must be a list, got null")
    turns = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise Malformed(f"{conversations_field}[{i}]: expected {{\"from\": str, \"value\": str}}")
        role = ROLE_MAP.get(turn["from"].strip().lower())
        if role is None:
            return Reject("unknown_role")
        turns.append((role, strip_image_token(turn["value"])))
    bad = check_turns(turns)
    if bad is not None:
        return bad
    ref = _image_ref(rec.get(image_field))
    if isinstance(ref, Reject):
        return ref
    return Parsed(ref, turns)


def parse_caption_record(rec: Any, image_field: str, caption_field: str) -> tuple[Any, str] | Reject:
    image = _field(rec, image_field, (str, int, list), "the image reference")
    caption = _field(rec, caption_field, (str,), "the caption")
    ref = _image_ref(image)
    if isinstance(ref, Reject):
        return ref
    if not caption or not caption.strip():
        return Reject("no_caption")
    return ref, caption


# ---------------------------------------------------------------------------------------------
# Image references -> uids


AMBIGUOUS = "?ambiguous"
FAILED = "?failed"


def _url_path(url: str) -> str:
    if "://" in url:
        url = urlsplit(url).path
    return unquote(url.replace("\\", "/")).rstrip("/")


def key_of(ref: Any, rule: str, components: int = 2) -> Optional[str]:
    """The join key of an image reference (or a pairs URL) under ``rule``; None: no key."""
    if rule == "coco_id":
        if isinstance(ref, int):
            return str(ref)
        m = COCO_ID_RE.search(_url_path(str(ref)).rsplit("/", 1)[-1])
        return str(int(m.group(1))) if m else None
    path = _url_path(str(ref))
    if rule == "basename":
        return path.rsplit("/", 1)[-1] or None
    if rule == "path":
        parts = [p for p in path.split("/") if p and p != "."]
        return "/".join(parts[-components:]) if parts else None
    raise ValueError(rule)


class ImageIndex:
    """Join key -> uid over a pairs table, for one rule. Keys shared by different images map to
    AMBIGUOUS; images that failed to download map to FAILED. Built once, reading only the
    ``uid``, ``url`` and ``status`` columns (never the image bytes)."""

    def __init__(self, pairs_path: str, rule: str, components: int = 2):
        manifest = Manifest.load(pairs_path)
        if manifest is None:
            raise FileNotFoundError(
                f"instruct.pairs: no pairs table at {pairs_path} (needed to map image references by {rule}); "
                "run `lmeye download` first or use image_key: url / uid"
            )
        self.map: dict[str, str] = {}
        fs, root = fsspec.core.url_to_fs(pairs_path)
        for name in sorted(manifest.shards):
            with fs.open(root.rstrip("/") + "/" + name) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["uid", "url", "status"], batch_size=65536):
                    d = batch.to_pydict()
                    for uid, url, status in zip(d["uid"], d["url"], d["status"]):
                        key = key_of(url, rule, components)
                        if key is None:
                            continue
                        value = uid if status == SUCCESS else FAILED
                        old = self.map.get(key)
                        if old is None:
                            self.map[key] = value
                        elif old != value:
                            self.map[key] = AMBIGUOUS

    def __len__(self) -> int:
        return len(self.map)


def resolve(ref: Any, rule: str, index: Optional[ImageIndex], components: int, url_prefix: str) -> str | Reject:
    """The uid of an image reference, or a Reject naming why there is none."""
    if rule == "uid":
        s = str(ref).strip().lower()
        return s if UID_RE.match(s) else Reject("bad_uid")
    if rule == "url":
        return uid_for(url_prefix + str(ref))
    key = key_of(ref, rule, components)
    if key is None:
        return Reject("unparsable_image_ref")
    uid = index.map.get(key) if index is not None else None
    if uid is None:
        return Reject("image_not_in_pairs")
    if uid == AMBIGUOUS:
        return Reject("ambiguous_image")
    if uid == FAILED:
        return Reject("image_failed")
    return uid


# ---------------------------------------------------------------------------------------------
# Caption templates


@dataclass
class TaskTemplates:
    prompts: list[str]
    responses: list[str]


def load_templates(path: str, tasks: list[str]) -> dict[str, TaskTemplates]:
    """Read and check the templates file; every task in ``tasks`` must be there."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"instruct.templates: {path}: no such file") from None
    except yaml.YAMLError as err:
        raise ValueError(f"instruct.templates: {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"instruct.templates: {path}: expected a mapping of task -> {{prompts, responses}}")
    out: dict[str, TaskTemplates] = {}
    for task in tasks:
        spec = raw.get(task)
        if spec is None:
            raise ValueError(f"instruct.templates: {path}: no task '{task}' (has: {', '.join(map(str, raw))})")
        if not isinstance(spec, dict) or set(spec) - {"prompts", "responses"}:
            raise ValueError(f"instruct.templates: {path}: {task}: expected exactly the keys prompts and responses")
        prompts, responses = spec.get("prompts"), spec.get("responses")
        for key, items in (("prompts", prompts), ("responses", responses)):
            if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
                raise ValueError(f"instruct.templates: {path}: {task}.{key}: expected a non-empty list of strings")
        for r in responses:
            rest = r.replace("{caption}", "").replace("{caption_clause}", "")
            if r == rest:
                raise ValueError(f"instruct.templates: {path}: {task}.responses: {r!r} uses neither {{caption}} nor {{caption_clause}}")
            if "{" in rest or "}" in rest:
                raise ValueError(f"instruct.templates: {path}: {task}.responses: {r!r}: unknown placeholder")
        out[task] = TaskTemplates([p.strip() for p in prompts], responses)
    return out


def caption_clause(caption: str) -> str:
    """"A dog on a sofa." -> "a dog on a sofa" (acronyms such as "NASA ..." keep their case)."""
    c = caption.strip().rstrip(" .")
    first = c.split(" ", 1)[0]
    return c if len(first) > 1 and first.isupper() else c[:1].lower() + c[1:]


def fill(template: str, caption: str) -> str:
    if "{caption_clause}" in template:
        template = template.replace("{caption_clause}", caption_clause(caption))
    return template.replace("{caption}", caption)
