"""Slicing geometry, pixel strips, NaViT position ids, vision batches and placeholders (runtime/preprocess/image.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minicpmo.runtime.errors import BundleError
from minicpmo.runtime.preprocess.image import (
    SlicingParams,
    best_resize,
    build_vision_batch,
    ensure_divide,
    image_placeholder,
    normalize,
    position_ids,
    refine_size,
    slice_grid,
    slice_image,
    to_patches,
)

P = SlicingParams()
TOKENS = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
          "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>"}


def gradient(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# -- geometry ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("length, expected", [
    (707, 700),  # 50.5 patches: banker's rounding goes down to 50
    (721, 728),  # 51.5 -> 52
    (3, 14),  # never below one patch
    (20.5, 14), (28.0, 28), (35.0, 28),  # 2.5 -> 2
])
def test_ensure_divide(length, expected):
    assert ensure_divide(length, 14) == expected


@pytest.mark.parametrize("size, upscale, expected", [
    ((1000, 400), False, (700, 280)),
    ((300, 900), False, (252, 770)),
    ((448, 448), False, (448, 448)),
    ((200, 150), False, (196, 154)),  # small images are only rounded without upscale
    ((200, 150), True, (518, 392)),
    ((406 / 1, 490 / 1), True, (406, 490)),
])
def test_best_resize(size, upscale, expected):
    assert best_resize(size, 448, 14, upscale) == expected


@pytest.mark.parametrize("size, expected", [
    ((1000, 400), (3, 1)), ((300, 900), (1, 3)), ((1344, 896), (3, 2)),
    ((448, 448), None), ((200, 150), None),
    ((500, 500), (1, 2)),  # [1,2] and [2,1] tie: the first candidate wins (strict <)
    ((4000, 4000), (3, 3)),  # capped at 9 slices
    ((5000, 100), (4, 1)),  # 3 slices by area; the widest candidate of 2..4 wins
    ((1, 1), None),
])
def test_slice_grid(size, expected):
    assert slice_grid(size, 448, 9) == expected


def test_refine_size():
    assert refine_size((1000, 400), (3, 1), 448, 14) == (1218, 490)


@pytest.mark.parametrize("size, grid, tgt", [
    ((1000, 400), (3, 1), [(20, 50)] + [(35, 29)] * 3),
    ((300, 900), (1, 3), [(55, 18)] + [(32, 32)] * 3),
    ((1344, 896), (3, 2), [(26, 39)] + [(32, 32)] * 6),
    ((448, 448), None, [(32, 32)]),
    ((200, 150), None, [(28, 37)]),
])
def test_slice_image_sizes(size, grid, tgt):
    sliced = slice_image(gradient(*size), P)
    assert sliced.grid == grid
    assert [(s.size[1] // 14, s.size[0] // 14) for s in sliced.slices] == tgt
    assert all(s.mode == "RGB" for s in sliced.slices)


def test_slice_image_tiles_are_row_major_crops_of_the_refined_image():
    img = gradient(1000, 400)
    sliced = slice_image(img, P)
    refined = np.asarray(img.resize((1218, 490), Image.Resampling.BICUBIC))
    tiles = [np.asarray(t) for t in sliced.slices[1:]]
    assert np.array_equal(np.concatenate(tiles, axis=1), refined)
    source = np.asarray(img.resize((700, 280), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(sliced.slices[0]), source)


def test_slice_mode_off_gives_one_resized_slice():
    params = SlicingParams(slice_mode=False)
    sliced = slice_image(gradient(1344, 896), params)
    assert sliced.grid is None and len(sliced.slices) == 1
    assert sliced.slices[0].size == best_resize((1344, 896), 448, 14, True)


# -- pixels ------------------------------------------------------------------------------------------

def test_normalize_float32_math():
    px = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = normalize(px, (0.5,) * 3, (0.5,) * 3)
    assert out.dtype == np.float32 and out.shape == (3, 1, 1)
    expected = (np.float32(128) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert out[0, 0, 0] == -1.0 and out[2, 0, 0] == 1.0 and out[1, 0, 0] == expected


def test_to_patches_strip_layout():
    img = gradient(42, 28)  # 2 x 3 patches
    strip = to_patches(img, P)
    assert strip.shape == (3, 14, 6 * 14) and strip.dtype == np.float32
    x = normalize(np.asarray(img), P.norm_mean, P.norm_std)
    for n in range(6):
        r, q = divmod(n, 3)
        assert np.array_equal(strip[:, :, n * 14:(n + 1) * 14], x[:, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14])


def test_to_patches_matches_torch_unfold():
    torch = pytest.importorskip("torch")
    img = gradient(56, 42)
    x = normalize(np.asarray(img), P.norm_mean, P.norm_std)
    t = torch.from_numpy(x)
    patches = torch.nn.functional.unfold(t, (14, 14), stride=(14, 14))  # as upstream reshape_by_patch
    ref = patches.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1).numpy()
    assert np.array_equal(to_patches(img, P), ref)


def test_to_patches_rejects_unaligned_size():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        to_patches(gradient(30, 28), P)


# -- position ids ------------------------------------------------------------------------------------

# Where torch's float32 arange lands just below a bucket boundary: bucket != floor(i*70/h) (checked
# against torch 2.x on x86).
OFF_BOUNDARY = {
    25: {5: 13, 10: 27, 15: 41, 20: 55},
    49: {7: 9, 14: 19, 35: 49, 42: 59},
    50: {5: 6, 10: 13, 15: 20, 20: 27, 30: 41, 40: 55},
    55: {11: 13, 22: 27, 33: 41, 44: 55},
    77: {55: 49},
    98: {7: 4, 14: 9, 35: 24, 42: 29, 56: 39, 70: 49, 84: 59},
    100: {10: 6, 20: 13, 30: 20, 40: 27, 80: 55},
    110: {11: 6, 22: 13, 33: 20, 44: 27, 66: 41, 88: 55},
}


@pytest.mark.parametrize("h", [1, 2, 5, 7, 10, 14, 25, 35, 49, 50, 55, 70, 77, 98, 100, 110])
def test_position_id_buckets_golden(h):
    expected = [OFF_BOUNDARY.get(h, {}).get(i, i * 70 // h) for i in range(h)]
    assert position_ids(h, 1).tolist() == [b * 70 for b in expected]
    assert position_ids(1, h).tolist() == expected


def test_position_ids_layout():
    ids = position_ids(2, 3)
    assert ids.dtype == np.int64
    assert ids.tolist() == [0, 23, 46, 35 * 70, 35 * 70 + 23, 35 * 70 + 46]


def _torch_position_ids(torch, h: int, w: int, nps: int = 70) -> np.ndarray:
    # upstream SiglipVisionEmbeddings.forward, with tgt_sizes an int32 tensor as get_vllm_embedding makes it
    tgt = torch.tensor([[h, w]], dtype=torch.int32)
    boundaries = torch.arange(1 / nps, 1.0, 1 / nps)
    fh = torch.arange(0, 1 - 1e-6, 1 / tgt[0][0])
    fw = torch.arange(0, 1 - 1e-6, 1 / tgt[0][1])
    bh = torch.bucketize(fh, boundaries, right=True)
    bw = torch.bucketize(fw, boundaries, right=True)
    return (bh[:, None] * nps + bw).flatten().numpy()


def test_position_ids_match_torch_for_all_sizes():
    torch = pytest.importorskip("torch")
    mismatches = [(h, w) for h in range(1, 111) for w in range(1, 111)
                  if not np.array_equal(position_ids(h, w), _torch_position_ids(torch, h, w))]
    assert mismatches == []


# -- vision batch ------------------------------------------------------------------------------------

def test_build_vision_batch_pads_and_masks():
    a, b = to_patches(gradient(42, 28), P), to_patches(gradient(14, 14), P)
    batch = build_vision_batch([a, b], [(2, 3), (1, 1)], P)
    assert batch.pixel_values.shape == (2, 3, 14, 6 * 14) and batch.pixel_values.dtype == np.float32
    assert np.array_equal(batch.pixel_values[0], a)
    assert np.array_equal(batch.pixel_values[1, :, :, :14], b)
    assert not batch.pixel_values[1, :, :, 14:].any()
    assert batch.patch_attention_mask.tolist() == [[True] * 6, [True] + [False] * 5]
    assert np.array_equal(batch.position_ids[0], position_ids(2, 3))
    assert batch.position_ids[1].tolist() == [0] * 6
    assert batch.tgt_sizes.dtype == np.int64 and batch.tgt_sizes.tolist() == [[2, 3], [1, 1]]


def test_build_vision_batch_rejects_mismatch():
    strip = to_patches(gradient(42, 28), P)
    with pytest.raises(ValueError, match="strip 0"):
        build_vision_batch([strip], [(3, 3)], P)
    with pytest.raises(ValueError, match="one \\(h, w\\) per strip"):
        build_vision_batch([strip], [(2, 3), (1, 1)], P)


# -- placeholder and params --------------------------------------------------------------------------

def test_image_placeholder_sliced():
    params = SlicingParams(query_num=2)
    text = image_placeholder(3, (2, 2), params, TOKENS)
    block = "<slice><unk><unk></slice>"
    assert text == "<image_id>3</image_id><image><unk><unk></image>" + block * 2 + "\n" + block * 2


def test_image_placeholder_frame_and_unsliced():
    params = SlicingParams(query_num=1)
    assert image_placeholder(None, None, params, TOKENS) == "<image><unk></image>"
    assert image_placeholder(0, None, SlicingParams(query_num=1, use_image_id=False), TOKENS) == "<image><unk></image>"
    assert image_placeholder(None, (1, 2), params, TOKENS) == "<image><unk></image><slice><unk></slice>\n<slice><unk></slice>"


def test_slicing_params_round_trip():
    d = P.as_dict()
    assert d["norm_mean"] == [0.5, 0.5, 0.5]
    assert SlicingParams.from_dict({**d, "future_key": 1}) == P
    assert SlicingParams.from_dict({"max_slice_nums": 2}).max_slice_nums == 2


@pytest.mark.parametrize("bad", [{"patch_size": 0}, {"query_num": "64"}, {"norm_std": [0.5, 0.0, 0.5]},
                                 {"norm_mean": [0.5]}])
def test_slicing_params_rejects_bad_values(bad):
    with pytest.raises(BundleError, match="preprocessing"):
        SlicingParams.from_dict(bad)
