"""One function per op pattern. Each takes explicit arguments and returns its output name(s).

Weights arrive as float32 numpy arrays in nn.Linear layout [out, in]; `linear` decides how they are
stored (fp32/fp16 MatMul, or MatMulNBits int4/int8) and records the quantization error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .graph import MS_DOMAIN, NP_TO_ONNX, GraphBuilder
from .quant import quantize_weight, relative_error

# Called with (weight name, relative reconstruction error) for every quantized weight.
ErrorSink = Callable[[str, float], None]


def linear(g: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray | None, *,
           precision: str, block_size: int = 32, accuracy_level: int = 4,
           on_error: ErrorSink | None = None, dtype=np.float32, importance: np.ndarray | None = None) -> str:
    """y = x @ W.T + b with W [N, K]; x and y are of `dtype` (the graph's compute type). `importance`
    [K] weights the 2/4-bit range search (export/imatrix.py).

    fp32 -> MatMul (+Add); fp16 storage in an fp32 graph -> fp16 weight cast to fp32 at load (half the
    file; CPU has no fast fp16 GEMM); int4/int8 -> MatMulNBits with the bias folded into its bias input
    and scales of `dtype` (MatMulNBits takes them in the activations' type).
    """
    n, k = weight.shape
    dtype = np.dtype(dtype)
    if precision in ("fp32", "fp16"):
        stored = np.dtype(np.float32 if precision == "fp32" else np.float16)
        w = g.initializer(f"{name}/weight", np.ascontiguousarray(weight.T).astype(stored))
        if stored != dtype:
            w = g.op("Cast", [w], f"{name}/weight/Cast", to=NP_TO_ONNX[dtype])
        y = g.op("MatMul", [x, w], f"{name}/MatMul")
        if bias is not None:
            y = g.op("Add", [y, g.initializer(f"{name}/bias", bias.astype(dtype))], f"{name}/Add")
        return y
    bits = {"int2": 2, "int4": 4, "int8": 8}[precision]
    q = quantize_weight(weight, bits, block_size, importance=importance if bits < 8 else None)
    if dtype != np.float32:
        q.scales = q.scales.astype(dtype)  # what the graph stores, so the error below is the real one
    if on_error is not None:
        on_error(name, relative_error(weight, q))
    inputs = [x, g.initializer(f"{name}/qweight", q.packed), g.initializer(f"{name}/scales", q.scales),
              g.initializer(f"{name}/zero_points", q.zero_points), "", ""]
    if bias is not None:
        inputs[5] = g.initializer(f"{name}/bias", bias.astype(dtype))
    else:
        inputs = inputs[:4]
    return g.op("MatMulNBits", inputs, f"{name}/MatMulNBits", domain=MS_DOMAIN,
                K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)


# How many of the scan's best tokens get their logits recomputed from int8 weights, per scan width. The
# int8 head's best token sits far inside the int4 top 64 (int4 moves a logit by ~0.1 of the logits'
# spread, while rank 1 and rank 64 of a 150k vocabulary lie ~1 spread apart), and rescoring 64 rows
# costs ~0.5 ms of a 7B step (TopK, Gather, DequantizeLinear; measured). A 2-bit scan moves a logit ~4x
# as far: on the synthetic 1.5B checkpoint (flat, random-weight logits) its top 64 held the fp32 head's
# argmax 96.1% of the time, its top 128 98.0% (the int4 scan's top 64: 98.4%), its top 256 98.4%, at
# +0.4 ms per doubling at 7B. Sampling with top_k <= 64 (128), or a top_p nucleus inside them, sees
# int8-accurate logits only.
RESCORE_CANDIDATES = {4: 64, 2: 128}


# The 2-bit scan's block: ONNX Runtime's 2-bit MatMulNBits kernel (accuracy level 4) packs 2.5 bits per
# weight at 128 and streams them as fast as the 4-bit one, while at 256 it falls back to a path hundreds
# of times slower (ORT 1.32, 3584 x 8192: 0.12 against 67 ms). So a 2-bit scan always uses 128, whatever
# the layers' block size.
SCAN2_BLOCK = 128


def rescored_head(g: GraphBuilder, name: str, x: str, weight: np.ndarray, *, candidates: int | None = None,
                  scan_bits: int = 4, block_size: int = 64, accuracy_level: int = 4,
                  on_error: ErrorSink | None = None, dtype=np.float32, importance: np.ndarray | None = None) -> str:
    """The vocabulary head as an int4 (or int2) scan plus int8 rescoring: logits = the scan's logits,
    except the top `candidates` of them, recomputed with int8 weights and unquantized activations.

    Why: decoding reads every head weight once per token. An int8 head is 13% of a 7B step's bytes (25%
    at 1.5B); an int4 one reads half of that but is ~10% off per weight. Rescoring gives the tokens that
    can win int8 accuracy again, and reads 64 rows. A 2-bit scan (SCAN2_BLOCK) reads 2.5 bits per weight
    against the int4 scan's 4.25-5 and is ~37% off per weight: it only has to rank the winner among its
    128 best, but the tail's logits (what sampling sees outside them) are that coarse. The int8 tables
    are `resident` initializers: the runtime loads them into memory itself, as ONNX Runtime would
    memory-map them and fault rows in from disk mid-decode (the Gather at 7B: 11 ms per step on a cold
    page cache, 0.9 ms warm, 0.3 ms resident).

        x ─ MatMulNBits(int4|2) ─ coarse ─ TopK ─ idx ─ Gather(int8 rows, scales, zero points)
        │                          │                      DequantizeLinear(blocked) ─ w [R, k, K]
        └───────────────────────── │ ────────────────────── MatMul(x, wᵀ) ─ refined [1, R, k]
                                   └─ ScatterElements(coarse, idx, refined) ─ logits
    """
    if scan_bits not in RESCORE_CANDIDATES:
        raise ValueError(f"the scan is int4 or int2, got {scan_bits} bits")
    n, k = weight.shape
    candidates = min(candidates or RESCORE_CANDIDATES[scan_bits], n)
    dtype = np.dtype(dtype)
    coarse = linear(g, name, x, weight, None, precision=f"int{scan_bits}",
                    block_size=block_size if scan_bits == 4 else SCAN2_BLOCK,
                    accuracy_level=accuracy_level, on_error=on_error, dtype=dtype, importance=importance)
    q = quantize_weight(weight, 8, block_size)
    n_blocks = q.packed.shape[1]
    q.scales = q.scales.astype(dtype)
    if on_error is not None:
        on_error(f"{name}/rescore", relative_error(weight, q))
    # DequantizeLinear's blocked form wants the codes unpadded [N, K] and scales / zero points [N, blocks].
    codes = g.initializer(f"{name}/rescore/codes", q.packed.reshape(n, -1)[:, :k], resident=True)
    scales = g.initializer(f"{name}/rescore/scales", q.scales.reshape(n, n_blocks), resident=True)
    zero_points = g.initializer(f"{name}/rescore/zero_points", q.zero_points.reshape(n, n_blocks), resident=True)
    del q
    _, idx = g.node("TopK", [coarse, g.const([candidates])], f"{name}/rescore/TopK", n_out=2, axis=-1)
    flat = g.op("Reshape", [idx, g.const([-1])], f"{name}/rescore/flat")
    rows = [g.op("Gather", [t, flat], f"{name}/rescore/Gather_{what}", axis=0)
            for what, t in (("codes", codes), ("scales", scales), ("zero_points", zero_points))]
    w = g.op("DequantizeLinear", rows, f"{name}/rescore/DequantizeLinear", axis=1, block_size=block_size)
    # [R*k, K] -> [R, K, k] for the R rows of x [1, R, K]: one small batched MatMul of x as [R, 1, K]
    # gives [R, 1, k], reshaped back to idx's [1, R, k]
    w = g.op("Reshape", [w, g.const([-1, candidates, k])], f"{name}/rescore/Reshape")
    w = g.op("Transpose", [w], f"{name}/rescore/Transpose", perm=[0, 2, 1])
    x_rows = g.op("Reshape", [x, g.const([-1, 1, k])], f"{name}/rescore/Reshape_x")
    refined = g.op("MatMul", [x_rows, w], f"{name}/rescore/MatMul")
    refined = g.op("Reshape", [refined, g.op("Shape", [idx], f"{name}/rescore/Shape")],
                   f"{name}/rescore/Reshape_refined")
    return g.op("ScatterElements", [coarse, idx, refined], f"{name}/rescore/ScatterElements", axis=-1)


def rms_norm(g: GraphBuilder, name: str, x: str, weight: np.ndarray, eps: float, dtype=np.float32) -> str:
    """Fused RMSNorm (ONNX Runtime's SimplifiedLayerNormalization; statistics in fp32)."""
    w = g.initializer(f"{name}/weight", weight.astype(dtype))
    return g.op("SimplifiedLayerNormalization", [x, w], f"{name}/SimplifiedLayerNorm",
                axis=-1, epsilon=eps, stash_type=1)


def skip_rms_norm(g: GraphBuilder, name: str, x: str, skip: str, weight: np.ndarray,
                  eps: float, dtype=np.float32) -> tuple[str, str]:
    """Residual add fused with RMSNorm: returns (norm(x + skip), x + skip)."""
    w = g.initializer(f"{name}/weight", weight.astype(dtype))
    outs = g.node("SkipSimplifiedLayerNormalization", [x, skip, w], f"{name}/SkipSimplifiedLayerNorm",
                  n_out=4, domain=MS_DOMAIN, epsilon=eps)
    return outs[0], outs[3]


def layer_norm(g: GraphBuilder, name: str, x: str, weight: np.ndarray, bias: np.ndarray,
               eps: float, dtype=np.float32) -> str:
    w = g.initializer(f"{name}/weight", weight.astype(dtype))
    b = g.initializer(f"{name}/bias", bias.astype(dtype))
    return g.op("LayerNormalization", [x, w, b], f"{name}/LayerNorm", axis=-1, epsilon=eps)


def silu_mul(g: GraphBuilder, name: str, gate_up: str) -> str:
    """SwiGLU on a fused [.., 2I] gate|up projection: silu(gate) * up."""
    gate, up = g.node("Split", [gate_up], f"{name}/Split", n_out=2, axis=-1, num_outputs=2)
    sig = g.op("Sigmoid", [gate], f"{name}/Sigmoid")
    silu = g.op("Mul", [gate, sig], f"{name}/SiLU")
    return g.op("Mul", [silu, up], f"{name}/Mul")


def split_heads(g: GraphBuilder, name: str, x: str, heads: int, head_dim: int) -> str:
    """[B, L, H*Dh] -> [B, H, L, Dh]"""
    r = g.op("Reshape", [x, g.const([0, 0, heads, head_dim])], f"{name}/Reshape")
    return g.op("Transpose", [r], f"{name}/Transpose", perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, name: str, x: str, hidden: int) -> str:
    """[B, H, L, Dh] -> [B, L, H*Dh]"""
    t = g.op("Transpose", [x], f"{name}/Transpose", perm=[0, 2, 1, 3])
    return g.op("Reshape", [t, g.const([0, 0, hidden])], f"{name}/Reshape")


def sdpa(g: GraphBuilder, name: str, q: str, k: str, v: str, bias: str | None, scale: float) -> str:
    """Plain attention on [B, H, Lq, Dh] x [B, H, Lk, Dh] with an additive bias [B|1, 1|H, Lq|1, Lk].

        q ─┐
           MatMul(q, kᵀ)·scale ─ (+bias) ─ Softmax ─ MatMul(·, v)
        k ─┘                                          v ─┘
    """
    kt = g.op("Transpose", [k], f"{name}/k_T", perm=[0, 1, 3, 2])
    scores = g.op("MatMul", [q, kt], f"{name}/QK")
    scores = g.op("Mul", [scores, g.const(np.float32(scale), np.float32)], f"{name}/Scale")
    if bias is not None:
        scores = g.op("Add", [scores, bias], f"{name}/Bias")
    probs = g.op("Softmax", [scores], f"{name}/Softmax", axis=-1)
    return g.op("MatMul", [probs, v], f"{name}/PV")
