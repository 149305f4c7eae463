"""Image references -> uids: the join keys of the ``image_key`` rules and the index over a
``pairs`` table they are looked up in."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from lmeye.tables import TableReader
from lmeye.uid import uid_for
from pipelines.instruct.jsonio import Malformed
from pipelines.instruct.partition import is_uid
from pipelines.instruct.records import Reject
from schemas.pairs import SUCCESS, STATUS, UID as PAIRS_UID, URL

# COCO's own image names: 000000123456.jpg (2017), COCO_train2014_000000123456.jpg (2014, 2015),
# or the 12 digits alone. Nothing else holds a COCO id: Flickr30k, GQA or TextCaps names that end
# in digits are other images.
COCO_NAME_RE = re.compile(r"(?:COCO_[a-z]+20\d\d_)?(\d{12})(?:\.(?:jpg|jpeg|png))?", re.IGNORECASE)
AMBIGUOUS = "?ambiguous"
FAILED = "?failed"


def _url_path(url: str) -> str:
    if "://" in url:
        url = urlsplit(url).path
    return unquote(url.replace("\\", "/")).rstrip("/")


def key_of(ref: Any, rule: str, components: int = 2) -> Optional[str]:
    """The join key of an image reference (or a pairs URL) under ``rule``; None: no key.

    ``basename`` is the exact file name (``000100039X.jpg`` and ``0618127453.jpg`` stay
    themselves); ``coco_id`` is the id of an integer or a COCO-named file, None for any other."""
    if rule == "coco_id":
        if isinstance(ref, int) and not isinstance(ref, bool):
            return str(ref) if ref >= 0 else None
        m = COCO_NAME_RE.fullmatch(_url_path(str(ref)).rsplit("/", 1)[-1])
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
    uid, url and status columns."""

    def __init__(self, pairs: TableReader, rule: str, components: int = 2):
        self.map: dict[str, str] = {}
        for batch in pairs.iter_batches(columns=[PAIRS_UID, URL, STATUS]):
            d = batch.to_pydict()
            for uid, url, status in zip(d[PAIRS_UID], d[URL], d[STATUS]):
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
    """The uid of an image reference, or a Reject naming why there is none; ``Malformed`` for a
    reference that is not COCO's under ``coco_id``."""
    if rule == "uid":
        s = str(ref).strip().lower()
        return s if is_uid(s) else Reject("bad_uid")
    if rule == "url":
        return uid_for(url_prefix + str(ref))
    key = key_of(ref, rule, components)
    if key is None and rule == "coco_id":  # not COCO's: the source is not (only) COCO
        raise Malformed(f"image reference {ref!r} is not a COCO image (an integer id, 000000123456.jpg or "
                        "COCO_train2014_000000123456.jpg); use image_key: path or basename for a mixed source")
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
