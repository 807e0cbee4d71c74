"""Block-wise weight quantization into the layout of ONNX Runtime's `MatMulNBits`.

The packing itself is ONNX Runtime's own C++ routine (`quantize_matmul_4bits` / `_8bits`, the one its
MatMulNBitsQuantizer calls): we only feed it one weight at a time, so an 8B model never has to exist
as an fp32 ONNX graph. Dequantization is written out in numpy for tests and error reports.
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


def quantize_weight(weight: np.ndarray, bits: int, block_size: int, rows_per_chunk: int = 8192) -> QuantizedWeight:
    """Asymmetric round-to-nearest block quantization of W[N, K] along K (ORT's default algorithm).

    Blocks run along K, so rows are independent: quantizing `rows_per_chunk` rows at a time keeps the
    fp32 transposed copy ORT's routine needs small (the 151700-row lm_head would need 2.2 GB at once).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    n, k = weight.shape
    n_blocks = (k + block_size - 1) // block_size
    zp_cols = (n_blocks * bits + 7) // 8
    packed = np.zeros((n, n_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, n_blocks), dtype=np.float32)
    zero_points = np.zeros((n, zp_cols), dtype=np.uint8)
    fn = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    for start in range(0, n, rows_per_chunk):
        stop = min(start + rows_per_chunk, n)
        # ORT's routine takes the MatMul B matrix [K, N] (x @ B), i.e. W transposed, in fp32.
        b = np.ascontiguousarray(weight[start:stop].T, dtype=np.float32)
        p, sc, zp = packed[start:stop], scales[start:stop], zero_points[start:stop]
        fn(p, b, sc, zp, block_size, stop - start, k, False)  # False: asymmetric (zero points)
    return QuantizedWeight(packed, scales.reshape(-1), zero_points.reshape(-1), bits, block_size, n, k)


def dequantize_weight(q: QuantizedWeight, rows: slice = slice(None)) -> np.ndarray:
    """Inverse of quantize_weight: W_hat[rows] [n, K] float32 (for tests and error reports)."""
    packed = q.packed[rows]
    n, n_blocks = packed.shape[0], packed.shape[1]
    zp_bytes = q.zero_points.reshape(q.n, -1)[rows]
    if q.bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, n_blocks, q.block_size)
        zps = np.stack([zp_bytes & 0x0F, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, :n_blocks]
    else:
        codes = packed.reshape(n, n_blocks, q.block_size)
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
