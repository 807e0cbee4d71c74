"""Image slicing, normalisation, patch strips, NaViT position ids and placeholder text (numpy/PIL only).

Mirrors the upstream MiniCPM-V image processor (image_processing_minicpmv.py) and the position-id
bucketing of modeling_navit_siglip.py, number for number. Loading untrusted bytes lives in
`image_io.py` and is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BundleError
from .image_io import load_image, open_image_bytes

__all__ = [
    "SlicingParams", "SlicedImage", "VisionBatch", "best_resize", "build_vision_batch", "ensure_divide",
    "image_placeholder", "load_image", "normalize", "open_image_bytes", "position_ids", "refine_size",
    "slice_grid", "slice_image", "to_patches",
]


@dataclass(frozen=True)
class SlicingParams:
    """Preprocessing constants, stored in the bundle manifest under "preprocessing"."""

    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    query_num: int = 64
    slice_mode: bool = True
    use_image_id: bool = True
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_patches_per_side: int = 70  # vision image_size // patch_size: the position-embedding grid

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlicingParams:
        """Build from a manifest dict; unknown keys are ignored, bad values raise BundleError."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("norm_mean", "norm_std"):
            if key in kw:
                kw[key] = tuple(float(x) for x in kw[key])
        params = cls(**kw)
        params._validate()
        return params

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["norm_mean"], d["norm_std"] = list(self.norm_mean), list(self.norm_std)
        return d

    def _validate(self) -> None:
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "query_num", "num_patches_per_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BundleError(f"preprocessing.{name} must be a positive integer, got {value!r}")
        for name in ("norm_mean", "norm_std"):
            if len(getattr(self, name)) != 3:
                raise BundleError(f"preprocessing.{name} must hold 3 values, got {getattr(self, name)!r}")
        if min(self.norm_std) <= 0:
            raise BundleError(f"preprocessing.norm_std must be positive, got {self.norm_std!r}")


# -- geometry (upstream: ensure_divide, find_best_resize, get_refine_size, get_sliced_grid) ------------

def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of patch_size, at least one patch. Python round(): ties go to even."""
    return max(round(length / patch_size) * patch_size, patch_size)


def best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                allow_upscale: bool = False) -> tuple[int, int]:
    """(w, h) with area about scale_resolution² (only shrinks unless allow_upscale), multiples of patch."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int,
                patch_size: int) -> tuple[int, int]:
    """(w, h) the whole image is resized to before it is cut into cols x rows equal tiles."""
    cols, rows = grid
    tile_w = ensure_divide(size[0], cols) / cols
    tile_h = ensure_divide(size[1], rows) / rows
    best_w, best_h = best_resize((tile_w, tile_h), scale_resolution, patch_size, allow_upscale=True)
    return best_w * cols, best_h * rows


def slice_grid(size: tuple[int, int], scale_resolution: int, max_slices: int) -> tuple[int, int] | None:
    """(cols, rows) of tiles whose aspect best matches the image, or None when it needs no slicing."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]
    best, best_error = None, float("inf")
    for n in counts:
        for cols in range(1, n + 1):
            if n % cols:
                continue
            error = abs(log_ratio - math.log(cols / (n // cols)))
            if error < best_error:  # strict: the first candidate wins a tie, as upstream
                best, best_error = (cols, n // cols), error
    return best


@dataclass
class SlicedImage:
    slices: list[Image.Image]  # [source] + tiles row-major (top-left first)
    grid: tuple[int, int] | None  # (cols, rows) of the tiles, None when unsliced


def slice_image(img: Image.Image, params: SlicingParams) -> SlicedImage:
    """Cut an RGB image into the upstream slices: the resized source, then the tiles row by row."""
    s, p = params.scale_resolution, params.patch_size
    if img.mode != "RGB":  # upstream converts first; resizing RGBA would weight by alpha
        img = img.convert("RGB")
    grid = slice_grid(img.size, s, params.max_slice_nums) if params.slice_mode else None
    if grid is None:  # one slice, scaled up or down to about s*s
        return SlicedImage([img.resize(best_resize(img.size, s, p, True), Image.Resampling.BICUBIC)], None)
    source = img.resize(best_resize(img.size, s, p), Image.Resampling.BICUBIC)  # downscale only
    refined = img.resize(refine_size(img.size, grid, s, p), Image.Resampling.BICUBIC)
    cols, rows = grid
    tile_w, tile_h = refined.size[0] // cols, refined.size[1] // rows
    tiles = [refined.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
             for r in range(rows) for c in range(cols)]
    return SlicedImage([source, *tiles], grid)


# -- pixels -----------------------------------------------------------------------------------------

def normalize(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: x/255, then (x - mean)/std, all in float32 as upstream."""
    x = pixels.astype(np.float32) / 255
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_patches(img: Image.Image, params: SlicingParams) -> np.ndarray:
    """One slice -> float32 strip [3, P, N*P]: its N = (H/P)*(W/P) patches side by side, raster order."""
    p = params.patch_size
    w, h = img.size
    if w % p or h % p:
        raise ValueError(f"slice size {w}x{h} is not a multiple of the patch size {p}")
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    x = normalize(np.asarray(rgb), params.norm_mean, params.norm_std)  # [3, H, W]
    # [3, h, P, w, P] -> [3, P(row in patch), h, w, P(col in patch)] -> [3, P, h*w*P]
    x = x.reshape(3, h // p, p, w // p, p).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape(3, p, -1))


# -- NaViT position ids ------------------------------------------------------------------------------

_VEC = 8  # floats per vector in torch's CPU arange kernel (Vectorized<float> as that kernel is built)


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """float32 torch.arange(start, end, step) bit for bit as torch's CPU kernel computes it.

    The kernel runs pairs of 8-float vectors: a vector starts at float32(start + step*i) and its lanes
    add k*step to that rounded base in double; leftover elements are float32(start + step*i).
    Computing every value as start + step*i differs in the last bit, which moves bucket boundaries.
    Checked against torch 2.x x86 builds (AVX2 and AVX-512 dispatch alike) for every size up to 999.
    """
    n = max(math.ceil((end - start) / step), 0)
    i = np.arange(n, dtype=np.int64)
    base_i = i - i % _VEC
    base = (start + step * base_i).astype(np.float32).astype(np.float64)
    vectorised = i < n - n % (2 * _VEC)
    values = np.where(vectorised, base + (i - base_i) * step, start + step * i)
    return values.astype(np.float32)


@lru_cache(maxsize=512)
def _buckets(n: int, num_patches_per_side: int) -> np.ndarray:
    boundaries = _torch_arange_f32(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    # upstream divides 1 by an int32 tensor element, so the step is a float32
    step = float(np.float32(1) / np.float32(n))
    fractions = _torch_arange_f32(0.0, 1 - 1e-6, step)
    buckets = np.searchsorted(boundaries, fractions, side="right").astype(np.int64)  # bucketize(right=True)
    buckets.flags.writeable = False  # shared by the cache
    return buckets


def position_ids(h: int, w: int, num_patches_per_side: int = 70) -> np.ndarray:
    """int64 [h*w]: position-embedding row of each patch of an h x w patch grid (NaViT bucketing)."""
    if h < 1 or w < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {h}x{w}")
    rows, cols = _buckets(int(h), num_patches_per_side), _buckets(int(w), num_patches_per_side)
    return (rows[:, None] * num_patches_per_side + cols[None, :]).reshape(-1)


@dataclass
class VisionBatch:
    pixel_values: np.ndarray  # float32 [n, 3, P, Lmax*P], zero-padded strips
    patch_attention_mask: np.ndarray  # bool [n, Lmax], True on the h*w real patches
    position_ids: np.ndarray  # int64 [n, Lmax], 0 on padding
    tgt_sizes: np.ndarray  # int64 [n, 2] = (h, w) in patches


def build_vision_batch(strips: list[np.ndarray], tgt_sizes, params: SlicingParams) -> VisionBatch:
    """Pad the strips of several slices to the longest and add their masks and position ids."""
    p = params.patch_size
    sizes = np.asarray(tgt_sizes, dtype=np.int64).reshape(-1, 2)
    if len(strips) != len(sizes) or not len(strips):
        raise ValueError(f"need one (h, w) per strip: {len(strips)} strips, {len(sizes)} sizes")
    lengths = sizes[:, 0] * sizes[:, 1]
    n, lmax = len(strips), int(lengths.max())
    pixels = np.zeros((n, 3, p, lmax * p), dtype=np.float32)
    mask = np.zeros((n, lmax), dtype=bool)
    pos = np.zeros((n, lmax), dtype=np.int64)
    for i, (strip, (h, w), length) in enumerate(zip(strips, sizes, lengths, strict=True)):
        if strip.shape != (3, p, length * p):
            raise ValueError(f"strip {i} has shape {strip.shape}, expected (3, {p}, {length * p}) "
                             f"for {h}x{w} patches")
        pixels[i, :, :, : length * p] = strip
        mask[i, :length] = True
        pos[i, :length] = position_ids(int(h), int(w), params.num_patches_per_side)
    return VisionBatch(pixels, mask, pos, sizes)


# -- placeholder text --------------------------------------------------------------------------------

def image_placeholder(k: int | None, grid: tuple[int, int] | None, params: SlicingParams,
                      tokens: dict[str, str]) -> str:
    """Prompt text standing for one image: [id k] + source block + rows of slice blocks joined by "\\n".

    k=None (a video frame) omits the image id. `tokens` holds the special-token strings of the manifest.
    """
    unk = tokens["unk"] * params.query_num
    text = tokens["im_start"] + unk + tokens["im_end"]
    if params.use_image_id and k is not None:
        text = f"{tokens['im_id_start']}{k}{tokens['im_id_end']}" + text
    if params.slice_mode and grid is not None:
        cols, rows = grid
        block = tokens["slice_start"] + unk + tokens["slice_end"]
        text += "\n".join(block * cols for _ in range(rows))
    return text
