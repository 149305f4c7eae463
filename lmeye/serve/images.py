"""Opening the image of a question: a local path, an http(s) URL, raw bytes or a PIL image.

Everything ends as bytes (or a PIL image) handed to the extraction stage's own decoder, so an image
asked about goes through the same code as an image in the `features` table. A URL is fetched with a
size cap and a timeout; any other scheme is refused (no file://, ftp:// or data: surprises).
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from typing import Union

from lmeye.errors import UserError

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # a 20 MB cap on what a question's image may weigh
FETCH_TIMEOUT_S = 15

ImageInput = Union[str, os.PathLike, bytes, "PIL.Image.Image"]  # noqa: F821


class ImageError(UserError):
    """An image that cannot be opened or fetched; the message names the path or URL."""


def describe(image: ImageInput) -> str:
    """How an image is named in messages."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, bytes):
        return f"<{len(image)} bytes>"
    return "<PIL image>"


def is_url(text: str) -> bool:
    return "://" in text


def fetch(url: str, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """GET an http(s) URL, refusing bodies over ``max_bytes``."""
    scheme = url.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"{url}: only http:// and https:// image URLs are fetched")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"{url}: image is {int(declared)} bytes, over the {max_bytes}-byte limit")
            data = resp.read(max_bytes + 1)
    except ImageError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ImageError(f"{url}: cannot fetch the image ({reason})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{url}: image is over the {max_bytes}-byte limit")
    return data


def read_bytes(image: Union[str, os.PathLike, bytes], max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The encoded bytes of a path, URL or bytes."""
    if isinstance(image, bytes):
        return image
    src = os.fspath(image)
    if is_url(src):
        return fetch(src, max_bytes)
    try:
        size = os.path.getsize(src)
        if size > max_bytes:
            raise ImageError(f"{src}: image is {size} bytes, over the {max_bytes}-byte limit")
        with open(src, "rb") as f:
            return f.read()
    except ImageError:
        raise
    except OSError as err:
        raise ImageError(f"{src}: cannot open the image ({err.strerror or err})") from None


def open_image(image: ImageInput):
    """A fully decoded PIL image (for previews and checks); raises ImageError naming the source."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    data = read_bytes(image)
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageError(f"{describe(image)}: not an image that can be opened ({err})") from None
