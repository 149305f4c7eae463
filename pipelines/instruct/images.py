"""Image references -> uids: the join keys of the ``image_key`` rules (looked up in the pairs
table by ``pipelines.instruct.join``), and the rules that need no pairs table."""

from __future__ import annotations

import re
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

from lmeye.uid import uid_for
from pipelines.instruct.jsonio import Malformed
from pipelines.instruct.partition import is_uid
from pipelines.instruct.records import Reject

# COCO's own image names: 000000123456.jpg (2017), COCO_train2014_000000123456.jpg (2014, 2015),
# or the 12 digits alone. Nothing else holds a COCO id: Flickr30k, GQA or TextCaps names that end
# in digits are other images.
COCO_NAME_RE = re.compile(r"(?:COCO_[a-z]+20\d\d_)?(\d{12})(?:\.(?:jpg|jpeg|png))?", re.IGNORECASE)


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


def join_key(ref: Any, rule: str, components: int) -> str | Reject:
    """The key an image reference joins the pairs table on (``pipelines.instruct.join``), or a
    Reject; ``Malformed`` for a reference that is not COCO's under ``coco_id``."""
    key = key_of(ref, rule, components)
    if key is None and rule == "coco_id":  # not COCO's: the source is not (only) COCO
        raise Malformed(f"image reference {ref!r} is not a COCO image (an integer id, 000000123456.jpg or "
                        "COCO_train2014_000000123456.jpg); use image_key: path or basename for a mixed source")
    return Reject("unparsable_image_ref") if key is None else key


def resolve(ref: Any, rule: str, url_prefix: str) -> str | Reject:
    """The uid of an image reference under a rule that needs no pairs table (``url``, ``uid``)."""
    if rule == "uid":
        s = str(ref).strip().lower()
        return s if is_uid(s) else Reject("bad_uid")
    if rule == "url":
        return uid_for(url_prefix + str(ref))
    raise ValueError(rule)
