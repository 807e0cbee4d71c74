"""Block-wise weight quantization into the layout of ONNX Runtime's `MatMulNBits`.

8-bit weights are packed by ONNX Runtime's own C++ routine (`quantize_matmul_8bits`, the one its
MatMulNBitsQuantizer calls). 4-bit weights (and the 2-bit ones of the int2+int8 head's scan) are
quantized here, in numpy, because ORT's routines for them are plain round-to-nearest over each block's
full [min, max]. We try a few narrower ranges per block and refit each one's scale by weighted least
squares, keeping the candidate with the smallest *weighted* squared error (llama.cpp's k-quant search).
The weights matter: on trained weights (Qwen2.5-Coder-1.5B, benchmarks/RESULTS.md section 11) a search
for the smallest plain squared error clips the large weights: at block 128 a layer's output error on real
activations came out 7-28% above round-to-nearest's (benchmarks/layer_error.py). Weighting each
weight's error by rms(block) + |w| (llama.cpp's rule for q4_K without an importance matrix) protects
them, and the same search then lands 1-5% below round-to-nearest.
With calibration activations (export/imatrix.py) the error is weighted by each input channel's mean
square, as llama.cpp's imatrix does. Either way one weight is quantized at a time, so an 8B model never
has to exist as an fp32 ONNX graph. Dequantization is written out in numpy for tests and error reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxruntime.capi import _pybind_state as ort_c


@dataclass
class QuantizedWeight:
    """MatMulNBits inputs for a weight W of shape [N, K] (nn.Linear layout, y = x @ W.T)."""

    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * n_blocks] (float16 for an fp16 graph)
    zero_points: np.ndarray  # uint8, packed along blocks: [N * ceil(n_blocks * bits / 8)]
    bits: int
    block_size: int
    n: int
    k: int


# The ranges tried per block, as fractions of its [min, max] (both ends scaled, 0 kept inside), per bit
# width. 4 bits: a 13-ratio grid down to 0.7 lowers the error by only 0.2-0.3% more (Gaussian, t(4)) at
# 4-6x the time. 2 bits (4 levels) clip much harder: at block 128 on Gaussian rows the error is 0.50
# unclipped, 0.41 with the 4-bit grid, 0.37 with this one, and a finer grid down to 0.4 gains nothing.
CLIP_RATIOS = {4: (1.0, 0.95, 0.9, 0.85, 0.8), 2: (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)}
CHUNK_ELEMENTS = 1 << 24  # weights per numpy pass (64 MB per fp32 temporary)


def quantize_weight(weight: np.ndarray, bits: int, block_size: int, rows_per_chunk: int = 8192,
                    clip_ratios: tuple[float, ...] | None = None,
                    importance: np.ndarray | None = None) -> QuantizedWeight:
    """Asymmetric block quantization of W[N, K] along K (with zero points).

    2 and 4 bits: per block, the range among `clip_ratios` (default CLIP_RATIOS[bits]) x [min, max], with
    its scale as is or refitted by weighted least squares for the codes it gave (the zero point stays an
    integer, as MatMulNBits stores it), whichever has the smallest weighted squared error. The weights:
    with `importance` [K] (the mean square of each input channel on calibration text, llama.cpp's
    imatrix), that channel's importance, since y = x @ W.T errs by sum_k x_k * dW_k; without, rms(block)
    + |w| (see the module's docstring). `clip_ratios=(1.0,)` without importance is plain
    round-to-nearest, ORT's default algorithm.
    8 bits: ORT's routine.
    Blocks run along K, so rows are independent and are quantized a chunk at a time (the 151700-row
    lm_head would need 2.2 GB at once).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    n_blocks = (k + block_size - 1) // block_size
    zp_cols = (n_blocks * bits + 7) // 8
    packed = np.zeros((n, n_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zero_points = np.zeros((n, zp_cols), dtype=np.uint8)
    if bits < 8:
        rows_per_chunk = max(1, min(rows_per_chunk, CHUNK_ELEMENTS // (n_blocks * block_size)))
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        p, sc, zp = packed[start:stop], scales[start:stop], zero_points[start:stop]
        if bits < 8:
            _quantize_low_bit_blocks(np.asarray(weight[start:stop], dtype=np.float32), bits, block_size,
                                     clip_ratios or CLIP_RATIOS[bits], p, sc, zp, importance)
        else:
            # ORT's routine takes the MatMul B matrix [K, N] (x @ B), i.e. W transposed, in fp32.
            b = np.ascontiguousarray(weight[start:stop].T, dtype=np.float32)
            ort_c.quantize_matmul_8bits(p, b, sc, zp, block_size, stop - start, k, False)  # False: asymmetric
    return QuantizedWeight(packed, scales.reshape(-1), zero_points.reshape(-1), bits, block_size, n, k)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [..., m] (m a multiple of 8 / bits) into bytes, the first code in the lowest bits."""
    per = 8 // bits
    out = codes[..., 0::per].copy()
    for j in range(1, per):
        out |= codes[..., j::per] << (bits * j)
    return out


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack: bytes [..., m] into codes [..., m * 8 / bits]."""
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(8 // bits)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)


def _quantize_low_bit_blocks(w: np.ndarray, bits: int, block_size: int, clip_ratios: tuple[float, ...],
                             packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray,
                             importance: np.ndarray | None = None) -> None:
    """Rows w[n, K] into packed [n, n_blocks, block_size * bits / 8], scales [n, n_blocks] and the zero
    points' bytes [n, ceil(n_blocks * bits / 8)], with ORT's conventions (those of dequantize_weight):
    value = (code - zero point) x scale; 8 / bits codes per byte, the first in the lowest bits; zero
    points likewise, along blocks. A partial last block is padded with zeros, whose code is the zero
    point."""
    n, k = w.shape
    n_blocks = packed.shape[1]
    levels = (1 << bits) - 1
    top = np.float32(levels)
    if k != n_blocks * block_size:
        w = np.pad(w, ((0, 0), (0, n_blocks * block_size - k)))
    blocks = w.reshape(n, n_blocks, block_size)
    plain = importance is None and tuple(clip_ratios) == (1.0,)
    imp = None if plain else _error_weights(blocks, importance, k)
    lo = np.minimum(blocks.min(axis=-1, keepdims=True), 0)  # 0 stays exactly representable
    hi = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
    best: list | None = None
    for ratio in clip_ratios:
        scale = (hi - lo) * np.float32(ratio / levels)
        scale[scale == 0] = 1.0  # an all-zero block: any scale, code = zero point
        zp = np.clip(np.round(-lo * np.float32(ratio) / scale), 0, top)
        candidates = [scale] if plain else [scale, _refit_scale(blocks, scale, zp, top, imp)]
        for sc in candidates:
            err = _block_error(blocks, sc, zp, top, imp)
            if best is None:
                best = [err, sc, zp]
            else:
                better = err < best[0]
                best = [np.where(better, err, best[0]), np.where(better, sc, best[1]), np.where(better, zp, best[2])]
    _, best_scale, best_zp = best
    codes = np.clip(np.round(blocks / best_scale) + best_zp, 0, top).astype(np.uint8)
    packed[...] = _pack(codes, bits)
    scales[...] = best_scale[..., 0]
    zps = best_zp[..., 0].astype(np.uint8)
    per = 8 // bits
    if n_blocks % per:
        zps = np.pad(zps, ((0, 0), (0, per - n_blocks % per)))
    zero_points[...] = _pack(zps, bits)


def _error_weights(blocks: np.ndarray, importance: np.ndarray | None, k: int) -> np.ndarray:
    """Each weight's share of the error: importance [K] of its input channel as [1, n_blocks, block],
    or, without one, rms(block) + |w| as [n, n_blocks, block]."""
    n_blocks, block_size = blocks.shape[1:]
    if importance is None:
        rms = np.sqrt(np.mean(np.square(blocks), axis=-1, keepdims=True))
        return rms + np.abs(blocks)
    imp = np.zeros(n_blocks * block_size, dtype=np.float32)
    imp[:k] = np.maximum(np.asarray(importance, dtype=np.float32).reshape(-1), 0)
    return imp.reshape(1, n_blocks, block_size)


def _block_error(blocks, scale, zp, top, imp) -> np.ndarray:
    """Squared reconstruction error per block [n, n_blocks, 1], weighted by imp when given."""
    diff = np.clip(np.round(blocks / scale) + zp, 0, top)
    diff -= zp
    diff *= scale
    diff -= blocks
    if imp is None:
        return np.einsum("ijk,ijk->ij", diff, diff)[..., None]
    return np.einsum("ijk,ijk,ijk->ij", diff, diff, np.broadcast_to(imp, diff.shape))[..., None]


def _refit_scale(blocks, scale, zp, top, imp) -> np.ndarray:
    """The scale minimising sum imp * (w - (c - zp) * s)^2 for the codes c that `scale` gives."""
    q = np.clip(np.round(blocks / scale) + zp, 0, top) - zp
    wq = imp * q
    num = np.einsum("ijk,ijk->ij", wq, blocks)[..., None]
    den = np.einsum("ijk,ijk->ij", wq, q)[..., None]
    refit = np.where(den > 0, num / np.where(den > 0, den, 1), scale)
    return np.where(refit > 0, refit, scale).astype(np.float32)


def dequantize_weight(q: QuantizedWeight, rows: slice = slice(None)) -> np.ndarray:
    """Inverse of quantize_weight: W_hat[rows] [n, K] float32 (for tests and error reports)."""
    packed = q.packed[rows]
    n, n_blocks = packed.shape[0], packed.shape[1]
    zp_bytes = q.zero_points.reshape(q.n, -1)[rows]
    if q.bits < 8:
        codes = _unpack(packed, q.bits)
        zps = _unpack(zp_bytes, q.bits)[:, :n_blocks]
    else:
        codes = packed
        zps = zp_bytes[:, :n_blocks]
    scales = q.scales.reshape(q.n, n_blocks)[rows]
    w = (codes.astype(np.float32) - zps[..., None].astype(np.float32)) * scales[..., None]
    return w.reshape(n, n_blocks * q.block_size)[:, : q.k]


def relative_error(weight: np.ndarray, q: QuantizedWeight, rows_per_chunk: int = 8192) -> float:
    """||W - W_hat||_F / ||W||_F: the reconstruction error reported per tensor at export (computed in
    row chunks, so the 151700-row lm_head needs no full-size dequantized copy)."""
    diff2 = norm2 = 0.0
    for start in range(0, q.n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, q.n))
        w = np.asarray(weight[rows], dtype=np.float32)
        diff2 += float(np.square(w - dequantize_weight(q, rows), dtype=np.float64).sum())
        norm2 += float(np.square(w, dtype=np.float64).sum())
    return float(np.sqrt(diff2 / norm2)) if norm2 else 0.0
