"""Image -> slices -> vision graph -> [n_slices, 64, D], with a content-keyed embedding cache.

Slicing (cheap) is separate from encoding (expensive) so the prompt length is known, and checked
against the context, before any vision work is spent.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from PIL import Image

from .preprocess.image import SlicingParams, build_vision_batch, slice_image, to_patches


@dataclass
class PreparedImage:
    key: str  # sha256 of the decoded pixels: identical images share embeddings and KV positions
    grid: tuple[int, int] | None
    strips: list[np.ndarray]  # [3, P, N*P] per slice (source first, then tiles row-major)
    tgt_sizes: list[tuple[int, int]]


def image_key(img: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """LRU of image embeddings bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def get(self, key: str) -> np.ndarray | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        if key in self._items:
            self.nbytes -= self._items.pop(key).nbytes
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes


class VisionEncoder:
    def __init__(self, session: ort.InferenceSession, params: SlicingParams, batch_size: int = 16,
                 cache_bytes: int = 256 * 1024 * 1024):
        self.session = session
        self.params = params
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache_bytes)

    def prepare(self, img: Image.Image, max_slice_nums: int | None = None) -> PreparedImage:
        params = self.params
        if max_slice_nums is not None:
            params = SlicingParams.from_dict({**params.as_dict(), "max_slice_nums": max_slice_nums})
        sliced = slice_image(img, params)
        strips = [to_patches(s, params) for s in sliced.slices]
        p = params.patch_size
        tgt = [(s.size[1] // p, s.size[0] // p) for s in sliced.slices]
        key = image_key(img) + f"/{params.max_slice_nums}"
        return PreparedImage(key, sliced.grid, strips, tgt)

    def encode(self, image: PreparedImage) -> np.ndarray:
        """[n_slices, 64, D] float32, from the cache when this image was seen before."""
        cached = self.cache.get(image.key)
        if cached is not None:
            return cached
        outs = []
        for start in range(0, len(image.strips), self.batch_size):
            batch = build_vision_batch(image.strips[start:start + self.batch_size],
                                       image.tgt_sizes[start:start + self.batch_size], self.params)
            feeds = {"pixel_values": batch.pixel_values, "patch_attention_mask": batch.patch_attention_mask,
                     "position_ids": batch.position_ids, "tgt_sizes": batch.tgt_sizes}
            outs.append(self.session.run(None, feeds)[0])
        embeds = np.concatenate(outs).astype(np.float32, copy=False)
        self.cache.put(image.key, embeds)
        return embeds
