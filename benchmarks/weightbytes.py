"""Bytes of weights a decode step reads, per file format: every tensor but the token-embedding
table (one row of it is read) and the rotary cos/sin tables (one row each)."""

from __future__ import annotations

from pathlib import Path

SKIPPED_ONNX = ("embed_tokens", "cos_cache", "sin_cache")


def onnx_bytes_per_token(model: Path) -> int:
    """Sum of an ONNX graph's initializer bytes (external or inline), minus the skipped tables."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        if any(s in t.name for s in SKIPPED_ONNX):
            continue
        total += _initializer_bytes(t)
    return total


def _initializer_bytes(t) -> int:
    import numpy as np
    import onnx

    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def gguf_bytes_per_token(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")
