"""Deterministic test pictures and sounds (importable from any test: tests/ is on sys.path)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with some texture (not pure noise: resizes must matter)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 120 * np.sin(x / (7 + 3 * c) + y / (11 + c) + c) for c in range(3)], -1)
    pix = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pix, "RGB")


def tone(seconds: float, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    """A sine with a little noise, 16 kHz float32 mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
