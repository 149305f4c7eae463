"""Streaming JSON input of the instruct stage: which files a source path names, and their records.

Nothing here holds a whole file: ``.json`` lists are decoded one element at a time and
``.jsonl`` one line at a time, so a multi-GB LMEyeMID or LLaVA file streams. A record that is
not valid JSON comes back as a ``Malformed`` value (the source's ``on_bad_record`` decides);
a file that is not a JSON list at all raises ``Malformed``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional

import fsspec

from lmeye.tables import is_local


class Malformed(Exception):
    """A record that is not the expected shape; the message says what is wrong with it."""


def list_files(path: str) -> list[str]:
    """A file, a folder (its *.json / *.jsonl, .gz too), or a glob; sorted, with protocol."""
    fs, root = fsspec.core.url_to_fs(path)
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if is_local(fs) else f"{proto}://"
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


# The members of a top-level JSON object that hold the records, as COCO and VQAv2 release them:
# captions_train2017.json and VQAv2's annotation files hold ``annotations`` (COCO's captions also
# hold ``images``, skipped), VQAv2's question files hold ``questions``.
RECORD_MEMBERS = ("annotations", "questions")


def iter_records(path: str, chunk_chars: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """``(where, record_or_Malformed)`` for every record of a .json list or a .jsonl file, or of
    the list a .json object holds under one of ``RECORD_MEMBERS`` (COCO, VQAv2 as released).

    ``where`` names the record for messages: ``"line 7"`` (1-based), ``"record 3"`` (0-based
    index into the list) or ``"annotations record 3"``. Blank lines of a .jsonl file are not
    records.
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
            buf = f.read(chunk_chars)
            start = len(buf) - len(buf.lstrip(_WS))
            if buf[start:start + 1] == "{":
                member, buf, start = _seek_member(f, path, chunk_chars, buf, start)
                yield from _iter_json_array(f, path, chunk_chars, buf, start, f"{member} record ")
            else:
                yield from _iter_json_array(f, path, chunk_chars, buf, start)


_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{},]')
_MEMBER_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|"|[\[\]{}:,]')
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


def _seek_member(f, path: str, chunk_chars: int, buf: str, pos: int) -> tuple[str, str, int]:
    """In a JSON object starting at ``buf[pos]``, find the first top-level member named in
    ``RECORD_MEMBERS`` whose value is a list, reading on as needed and skipping every other
    member's value (COCO's ``images``) without decoding it. Returns (member, buffer, position of
    its '[')."""
    depth, key, keys = 0, None, []
    while True:
        m = _MEMBER_TOKEN_RE.search(buf, pos)
        if m is None or m.group() == '"':  # the buffer ends, possibly inside a string: read on
            data = f.read(chunk_chars)
            if not data:
                break
            cut = m.start() if m is not None else len(buf)
            buf, pos = buf[cut:] + data, 0
            continue
        tok, pos = m.group(), m.end()
        if tok[0] == '"':
            key = tok if depth == 1 else None
        elif tok == ":" and key is not None:
            name = json.loads(key)
            keys.append(name)
            if name in RECORD_MEMBERS:
                while not buf[pos:].strip(_WS):  # only blanks left: read on
                    data = f.read(chunk_chars)
                    if not data:
                        break
                    buf += data
                start = len(buf) - len(buf[pos:].lstrip(_WS))
                if buf[start:start + 1] == "[":
                    return name, buf, start
            key = None
        elif tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                break
        else:
            key = None
    raise _ArrayError(f"{path}: expected a JSON list of records, or an object holding one under "
                      f"{' or '.join(repr(k) for k in RECORD_MEMBERS)} (COCO, VQAv2 as released); "
                      f"found an object with {', '.join(repr(k) for k in keys) or 'no members'}")


def _iter_json_array(f, path: str, chunk_chars: int, buf: str = "", pos: int = 0,
                     label: str = "record ") -> Iterator[tuple[str, Any]]:
    """The elements of the JSON list starting at ``buf[pos]`` (after leading blanks), the rest of
    it read from ``f`` as needed, each decoded on its own."""
    decoder = json.JSONDecoder()
    eof = False

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
                yield f"{label}{index}", obj
                pos = end
                break
            except json.JSONDecodeError as err:
                end = _find_element_end(buf, pos)
                if end is not None and (end < len(buf) or eof):
                    text = buf[pos:end].strip()
                    yield f"{label}{index}", Malformed(f"not valid JSON ({err.msg}: {text[:60]!r})")
                    pos = end
                    break
                if not more():
                    yield f"{label}{index}", Malformed(f"not valid JSON ({err.msg}); the file ends inside it")
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
