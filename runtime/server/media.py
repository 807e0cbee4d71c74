"""Request messages (OpenAI parts) -> runtime Messages with decoded media (PIL images, audio arrays).

An `image_url.url` may be an http(s) URL (fetched with the SSRF guard of fetch.py), a data: URI, raw
base64, or - only when the server has an allowed media folder - a local path or file:// URL that
resolves (symlinks and .. included) inside that folder. Relative paths are taken from that folder.
Byte and pixel limits apply before anything is decoded in full. Blocking: run it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import AudioError, ImageError, InputError
from ..preprocess.image import load_image, open_image_bytes
from ..preprocess.image_io import short
from ..types import Message
from .fetch import FetchPolicy, fetch_url
from .schemas import AudioPart, ChatMessage, ImagePart, TextPart, ToolCall, VideoPart
from .settings import ServerSettings

_MAX_PATH_CHARS = 4096
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int
    max_image_pixels: int
    max_images: int
    allowed_local_media: Path | None  # resolved folder, or None: no local files at all
    allow_urls: bool
    fetch: FetchPolicy

    @classmethod
    def from_settings(cls, s: ServerSettings) -> MediaPolicy:
        fetch = FetchPolicy(s.url_timeout, s.max_image_bytes, s.max_redirects, s.allow_private_urls)
        return cls(s.max_image_bytes, s.max_image_pixels, s.max_images_per_request, s.allowed_local_media,
                   s.allow_urls, fetch)


def to_runtime_messages(messages: list[ChatMessage], policy: MediaPolicy) -> list[Message]:
    """Decode every part of every message. Raises InputError (ImageError, AudioError) naming the part."""
    n_images = sum(isinstance(p, ImagePart) for m in messages if isinstance(m.content, list) for p in m.content)
    if n_images > policy.max_images:
        raise InputError(f"the request has {n_images} images, more than the limit of {policy.max_images}",
                         param="messages", code="too_many_images")
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content if m.content is not None else ""
        if isinstance(content, list):
            content = [_part(part, policy, f"messages[{i}].content[{j}]") for j, part in enumerate(content)]
        message = {"role": role, "content": content}
        if getattr(m, "tool_calls", None):
            message["tool_calls"] = [_tool_call(call) for call in m.tool_calls]
        out.append(message)
    return out


def _tool_call(call: ToolCall) -> dict:
    """A tool call as chat templates take it: arguments as an object (OpenAI sends a JSON string)."""
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # not JSON: the template writes the string as it is
    return {"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": arguments}}


def _part(part: TextPart | ImagePart | AudioPart | VideoPart, policy: MediaPolicy, param: str) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        param = f"{param}.image_url" + ("" if isinstance(part.image_url, str) else ".url")
        try:
            image = {"type": "image", "image": load_image_url(part.url, policy)}
        except InputError as e:
            e.param = param
            raise
        if part.detail == "low":  # OpenAI's low detail: one 512 px view; here the whole image, no slices
            image["max_slices"] = 1
        return image
    if isinstance(part, VideoPart):
        frames = []
        for k, url in enumerate(part.video_frames.frames):
            try:
                frames.append(load_image_url(url, policy))
            except InputError as e:
                e.param = f"{param}.video_frames.frames[{k}]"
                raise
        return {"type": "video", "frames": frames, "max_slices": part.video_frames.max_slices}
    return {"type": "audio", "audio": _decode_audio(part, f"{param}.input_audio")}


def load_image_url(url: str, policy: MediaPolicy) -> Image.Image:
    """Decode one image reference under the server's policy (see the module docstring)."""
    url = url.strip()
    head = url[:16].lower()
    if head.startswith(("http://", "https://")):
        if not policy.allow_urls:
            raise ImageError(f"{short(url)}: image URLs are disabled on this server")
        data = fetch_url(url, policy.fetch)
        return open_image_bytes(data, max_pixels=policy.max_image_pixels, source=short(url))
    if head.startswith("file://"):
        return _open_local(_file_url_path(url, policy.allowed_local_media), policy)
    local = _local_candidate(url, policy.allowed_local_media)
    if local is not None:
        return _open_local(local, policy)
    try:  # data: URI or raw base64; no files, no network
        return load_image(url, max_bytes=policy.max_image_bytes, max_pixels=policy.max_image_pixels,
                          allow_urls=False, allow_files=False)
    except ImageError as e:
        maybe_path = policy.allowed_local_media is not None or url.startswith(_PATH_PREFIXES)
        if not maybe_path or len(url) > _MAX_PATH_CHARS:
            raise
        raise ImageError(_path_refusal(url, policy.allowed_local_media)) from e


def _path_refusal(url: str, root: Path | None) -> str:
    if root is None:
        return (f"{short(url)}: local image paths are not allowed on this server (start it with "
                "--allowed-local-media DIR), and the text is not base64 image data either")
    return f"{short(url)}: not an image file inside the allowed media folder, nor base64 image data"


def _file_url_path(url: str, root: Path | None) -> Path:
    if root is None:
        raise ImageError(f"{short(url)}: local image files are not allowed on this server (start it with "
                         "--allowed-local-media DIR)")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{short(url)}: file:// URLs must name a local file (no host)")
    path = _inside(Path(urllib.parse.unquote(parts.path)), root)
    if path is None:
        raise ImageError(f"{short(url)}: the file is outside the allowed media folder")
    return path


def _local_candidate(url: str, root: Path | None) -> Path | None:
    """The resolved file a plain string names inside the allowed folder, or None (then: base64)."""
    if root is None or len(url) > _MAX_PATH_CHARS or "\n" in url:
        return None
    path = _inside(Path(url), root)
    try:
        return path if path is not None and path.is_file() else None
    except OSError:
        return None


def _inside(path: Path, root: Path) -> Path | None:
    """`path` (relative to `root` unless absolute) with symlinks and .. resolved, if it stays in `root`."""
    try:
        resolved = (root / path.expanduser()).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte, name too long
        return None
    return resolved if resolved.is_relative_to(root) else None


def _open_local(path: Path, policy: MediaPolicy) -> Image.Image:
    name = short(str(path))
    try:
        size = path.stat().st_size
        if size > policy.max_image_bytes:
            raise ImageError(f"{name}: file is {size} bytes, more than the limit of {policy.max_image_bytes}")
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise ImageError(f"{name}: no such image file in the allowed media folder") from e
    except OSError as e:
        raise ImageError(f"{name}: cannot read image file: {e.strerror or e}") from e
    return open_image_bytes(data, max_pixels=policy.max_image_pixels, source=name)


def _decode_audio(part: AudioPart, param: str):
    try:
        from ..preprocess.audio import decode_audio_bytes
    except ImportError as e:
        raise InputError(f"audio input is not supported by this build ({e})", param=param,
                         code="unsupported_audio") from e
    try:
        data = base64.b64decode(part.input_audio.data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AudioError("input_audio.data is not valid base64", param=f"{param}.data") from e
    try:
        return decode_audio_bytes(data, part.input_audio.format, source=param)
    except InputError as e:
        e.param = e.param or param
        raise
