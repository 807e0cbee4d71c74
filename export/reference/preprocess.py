"""Reference image slicing and placeholder text, following upstream image_processing_minicpmv.py.

Plain PIL + numpy + torch, written from the upstream math (ARCH §3, §6); independent of the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..hf_config import MiniCPMOConfig, SliceConfig

Grid = tuple[int, int]  # (cols, rows), the upstream [grid_x, grid_y] order


@dataclass(frozen=True)
class PreprocessedImage:
    """One image after slicing: strips [3, P, N*P] per slice (source first, then tiles row-major)."""

    strips: list[torch.Tensor]
    tgt_sizes: list[tuple[int, int]]  # (patch rows h, patch cols w) per slice
    grid: Grid | None  # None when the image is not sliced
    size: tuple[int, int]  # original (width, height)


def _slicing(cfg: MiniCPMOConfig | SliceConfig) -> SliceConfig:
    return cfg.slicing if isinstance(cfg, MiniCPMOConfig) else cfg


def ensure_divide(length: float, patch_size: int) -> int:
    # Python round(): banker's rounding, as upstream (round(50.5) == 50).
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) scaled to about scale_resolution² area, rounded to multiples of patch_size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: Grid, scale_resolution: int, patch_size: int,
                    allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) the original is resized to before cutting it into cols x rows tiles."""
    width, height = size
    cols, rows = grid
    refine_w = ensure_divide(width, cols)
    refine_h = ensure_divide(height, rows)
    tile_w, tile_h = find_best_resize((refine_w / cols, refine_h / rows), scale_resolution, patch_size,
                                      allow_upscale=allow_upscale)
    return tile_w * cols, tile_h * rows


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> Grid | None:
    """Best [cols, rows] for an image of (width, height), or None when it is not sliced."""
    width, height = size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    best, best_err = (1, 1), float("inf")
    for grid in candidates:
        err = abs(log_ratio - math.log(grid[0] / grid[1]))
        if err < best_err:  # strict: the first candidate wins ties
            best, best_err = grid, err
    return best


def slice_image(image: Image.Image, max_slice_nums: int, scale_resolution: int,
                patch_size: int) -> tuple[list[Image.Image], Grid | None]:
    """[source] + tiles (row-major), and the grid (None when not sliced)."""
    grid = get_sliced_grid(image.size, max_slice_nums, scale_resolution)
    if grid is None:
        best = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return [image.resize(best, resample=Image.Resampling.BICUBIC)], None
    best = find_best_resize(image.size, scale_resolution, patch_size)
    source = image.copy().resize(best, resample=Image.Resampling.BICUBIC)
    refine = get_refine_size(image.size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = image.resize(refine, resample=Image.Resampling.BICUBIC)
    tile_w, tile_h = refine[0] // grid[0], refine[1] // grid[1]
    tiles = [refined.crop((x, y, x + tile_w, y + tile_h))
             for y in range(0, refine[1], tile_h) for x in range(0, refine[0], tile_w)]
    return [source, *tiles], grid


def to_normalized_chw(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] holding (x/255 - 0.5)/0.5."""
    # numpy float32 arithmetic, as the upstream processor (and HF normalize) does it
    x = np.asarray(image.convert("RGB")).astype(np.float32) / 255
    x = (x - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def reshape_by_patch(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[3, H, W] -> [3, P, N*P]: the N patches (raster order) side by side in one strip."""
    patches = torch.nn.functional.unfold(image, (patch_size, patch_size), stride=(patch_size, patch_size))
    patches = patches.reshape(image.size(0), patch_size, patch_size, -1)  # [3, P, P, N]
    return patches.permute(0, 1, 3, 2).reshape(image.size(0), patch_size, -1)


def preprocess_image(image: Image.Image, cfg: MiniCPMOConfig | SliceConfig) -> PreprocessedImage:
    """Slice one image and turn every slice into a normalised patch strip."""
    sc = _slicing(cfg)
    rgb = image.convert("RGB")
    if sc.slice_mode:
        slices, grid = slice_image(rgb, sc.max_slice_nums, sc.scale_resolution, sc.patch_size)
    else:
        slices, grid = [rgb], None
    strips, tgt_sizes = [], []
    for piece in slices:
        chw = to_normalized_chw(piece)
        strips.append(reshape_by_patch(chw, sc.patch_size))
        tgt_sizes.append((chw.shape[1] // sc.patch_size, chw.shape[2] // sc.patch_size))
    return PreprocessedImage(strips=strips, tgt_sizes=tgt_sizes, grid=grid, size=image.size)


def preprocess_images(images: list[Image.Image], cfg: MiniCPMOConfig | SliceConfig
                      ) -> tuple[list[torch.Tensor], list[tuple[int, int]], list[PreprocessedImage]]:
    """All slices of all images in order: (strips, tgt_sizes, per-image results)."""
    per_image = [preprocess_image(im, cfg) for im in images]
    strips = [s for p in per_image for s in p.strips]
    tgt_sizes = [t for p in per_image for t in p.tgt_sizes]
    return strips, tgt_sizes, per_image


def image_placeholder(k: int, grid: Grid | None, cfg: MiniCPMOConfig | SliceConfig) -> str:
    """Placeholder text of the k-th image of a conversation (upstream get_slice_image_placeholder)."""
    sc = _slicing(cfg)
    unks = "<unk>" * sc.query_num
    text = f"<image>{unks}</image>"
    if sc.use_image_id:
        text = f"<image_id>{k}</image_id>" + text
    if sc.slice_mode and grid is not None:
        cols, rows = grid
        row = f"<slice>{unks}</slice>" * cols
        text += "\n".join([row] * rows)
    return text
