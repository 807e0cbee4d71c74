"""Video input as frames, as the MiniCPM-o model card feeds video: one frame per second (by default),
at most 64 frames (uniformly thinned beyond that), each frame an image with no image id and at most
2 slices. Decoding a video file uses PyAV when it is installed; a folder of frames needs nothing."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from ..errors import InputError
from .image_io import load_image

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def uniform_sample(items: list, n: int) -> list:
    """n items spread evenly over the list (the model card's uniform_sample), order kept."""
    if len(items) <= n:
        return items
    gap = len(items) / n
    return [items[int(i * gap + gap / 2)] for i in range(n)]


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in names by value: frame_2 before frame_10."""
    return [(0, int(piece), piece) if piece.isdigit() else (1, piece.lower(), piece)
            for piece in re.split(r"(\d+)", name) if piece]


def load_frame_dir(folder: str | Path, *, max_frames: int = 64) -> list[Image.Image]:
    """Frames from a folder of images, in natural name order (frame_2 before frame_10)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder of frames", param="frames")
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(f"{folder}: holds no image files ({', '.join(sorted(FRAME_SUFFIXES))})", param="frames")
    return [load_image(str(p)) for p in uniform_sample(files, max_frames)]


def load_video(path: str | Path, *, fps: float = 1.0, max_frames: int = 64) -> list[Image.Image]:
    """Decode a video file and keep `fps` frames per second (at most max_frames)."""
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}", param="fps")
    try:
        import av  # PyAV: FFmpeg bindings, optional
    except ImportError:
        raise InputError("decoding video files needs PyAV (pip install av); or pass a folder of frames",
                         param="video", code="video_unavailable") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 25)
            step = max(1, round(rate / fps))
            frames = [f.to_image().convert("RGB") for i, f in enumerate(container.decode(stream)) if i % step == 0]
    except (av.error.FFmpegError, IndexError, OSError) as e:
        raise InputError(f"{path}: cannot decode the video ({e})", param="video") from None
    if not frames:
        raise InputError(f"{path}: the video has no frames", param="video")
    return uniform_sample(frames, max_frames)
