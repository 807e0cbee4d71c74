"""Turn an untrusted image reference (bytes, path, URL, data URI, base64) into an RGB PIL image.

Every failure is an ImageError that names the (shortened) source, never a PIL traceback.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import urllib.error
import urllib.parse
import urllib.request
import warnings
from http.client import HTTPException
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_BYTES = 50_000_000
# What PIL's decoders raise on damaged data (each plugin has its own habits).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError,
                  KeyError, ZeroDivisionError)
_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def short(source: str, limit: int = 60) -> str:
    """A source string cut to a readable length for error messages."""
    source = source.strip()
    if len(source) <= limit:
        return source
    return f"{source[: limit - 20]}...{source[-12:]} ({len(source)} chars)"


def open_image_bytes(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     source: str = "image") -> Image.Image:
    """Decode encoded image bytes to a fully loaded RGB image, or raise ImageError.

    The pixel count is checked from the header before any pixel is decoded.
    """
    if not data:
        raise ImageError(f"{source}: the image data is empty")
    with warnings.catch_warnings():
        # Damaged files make PIL warn (truncated TIFF tags, bomb warnings below our own limit): the
        # outcome is decided by the exceptions and the pixel limit, not by stderr noise.
        warnings.simplefilter("ignore")
        img = _open_header(data, source)
        _check_size(img, max_pixels, source)
        return _decode_rgb(img, source)


def _open_header(data: bytes, source: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageError(f"{source}: cannot identify image (not an image, or an unsupported format)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: image is too large to decode safely ({e})") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{source}: cannot read image header: {e}") from e


def _decode_rgb(img: Image.Image, source: str) -> Image.Image:
    try:
        img.load()  # force the full decode now: truncated or corrupt data fails here
        return img.convert("RGB")  # as upstream: alpha is dropped, not composited
    except Image.DecompressionBombError as e:
        raise ImageError(f"{source}: image is too large to decode safely ({e})") from e
    except _DECODE_ERRORS as e:
        fmt = img.format or "image"
        raise ImageError(f"{source}: {fmt} data is truncated, corrupt or unsupported: {e}") from e


def _check_size(img: Image.Image, max_pixels: int | None, source: str) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"{source}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"{source}: image is {width}x{height} = {width * height} pixels, "
                         f"more than the limit of {max_pixels}")


def load_image(src: str, *, timeout_s: float = 10.0, max_bytes: int = DEFAULT_MAX_BYTES,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, allow_urls: bool = True,
               allow_files: bool = True) -> Image.Image:
    """Load an RGB image from a local path, an http(s) URL, a data: URI or raw base64 text.

    Args:
        src: the reference. Raw base64 is tried only when it is not an existing path.
        timeout_s: network timeout for URLs.
        max_bytes: cap on the encoded size, whatever the source.
        max_pixels: cap on width*height, checked before decoding (None = PIL's own bomb guard only).
        allow_urls / allow_files: a server can refuse network fetches or local paths.
    """
    if not isinstance(src, str) or not src.strip():
        raise ImageError("image source is empty")
    src = src.strip()
    name = short(src)
    lowered = src[:16].lower()
    if lowered.startswith("data:"):
        data = _read_data_uri(src, max_bytes, name)
    elif lowered.startswith(("http://", "https://")):
        if not allow_urls:
            raise ImageError(f"{name}: image URLs are not allowed here")
        data = _read_url(src, timeout_s, max_bytes, name)
    elif lowered.startswith("file://"):
        if not allow_files:
            raise ImageError(f"{name}: local image files are not allowed here")
        data = _read_file(Path(urllib.parse.unquote(urllib.parse.urlparse(src).path)), max_bytes, name)
    elif re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise ImageError(f"{name}: unsupported URL scheme (use http, https, file or data)")
    elif allow_files and _is_file(src):
        data = _read_file(Path(src).expanduser(), max_bytes, name)
    else:
        data = _decode_base64(src, max_bytes)
        if data is None:
            what = "an existing file, " if allow_files else ""
            raise ImageError(f"image source {name!r} is not {what}an http(s) URL, a data: URI "
                             "or base64 image data")
        return _open_base64(data, src, name, max_pixels, allow_files)
    return open_image_bytes(data, max_pixels=max_pixels, source=name)


def _open_base64(data: bytes, src: str, name: str, max_pixels: int | None, allow_files: bool) -> Image.Image:
    try:
        return open_image_bytes(data, max_pixels=max_pixels, source=f"base64 image ({len(src)} chars)")
    except ImageError as e:
        if len(src) > 256 or not allow_files:
            raise
        # a short string that happens to be valid base64 is more likely a mistyped path
        raise ImageError(f"image source {name!r} is not an existing file, and as base64 it is not an "
                         "image either") from e


def _is_file(src: str) -> bool:
    try:
        return Path(src).expanduser().is_file()
    except (OSError, ValueError):  # name too long, NUL byte...
        return False


def _read_file(path: Path, max_bytes: int, name: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageError(f"{name}: file is {size} bytes, more than the limit of {max_bytes}")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such image file") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name}: is a directory, not an image file") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot read image file: {e.strerror or e}") from e


def _read_url(url: str, timeout_s: float, max_bytes: int, name: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "minicpmo-onnx"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageError(f"{name}: image is {length} bytes, more than the limit of {max_bytes}")
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{name}: image URL answered HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise ImageError(f"{name}: cannot fetch image URL: {e.reason}") from e
    except (TimeoutError, HTTPException, OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot fetch image URL: {e or type(e).__name__}") from e
    if len(data) > max_bytes:
        raise ImageError(f"{name}: image is more than the limit of {max_bytes} bytes")
    return data


def _read_data_uri(src: str, max_bytes: int, name: str) -> bytes:
    m = _DATA_URI.fullmatch(src)
    if m is None:
        raise ImageError(f"{name}: malformed data URI (expected data:image/...;base64,...)")
    if "base64" not in [p.strip().lower() for p in m["params"].split(";")]:
        raise ImageError(f"{name}: only base64 data URIs are supported")
    data = _decode_base64(m["data"], max_bytes)
    if data is None:
        raise ImageError(f"{name}: data URI does not hold valid base64")
    return data


def _decode_base64(text: str, max_bytes: int) -> bytes | None:
    """Bytes of standard or URL-safe base64 text (whitespace ignored), or None when it is not base64."""
    compact = re.sub(r"\s+", "", text)
    if not compact:
        return None
    if len(compact) * 3 // 4 > max_bytes:
        raise ImageError(f"base64 image of about {len(compact) * 3 // 4} bytes is more than "
                         f"the limit of {max_bytes}")
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True) or None
    except (binascii.Error, ValueError):
        return None
