"""Bytes of weights a decode step reads, per file format: every tensor but the token-embedding
table (one row of it is read), the rotary cos/sin tables (one row each) and the int4+int8 head's
rescoring rows (its TopK's k of them are gathered per token)."""

from __future__ import annotations

from pathlib import Path

SKIPPED_ONNX = ("embed_tokens", "cos_cache", "sin_cache")
GATHERED_ONNX = "/rescore/"  # export/ops.rescored_head: [vocab, ...] tables read a few rows per token


def onnx_bytes_per_token(model: Path) -> int:
    """Sum of an ONNX graph's initializer bytes (external or inline), minus the skipped tables."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    candidates = _rescored_rows(proto)
    total = 0
    for t in proto.graph.initializer:
        if any(s in t.name for s in SKIPPED_ONNX):
            continue
        n = _initializer_bytes(t)
        if GATHERED_ONNX in t.name and t.dims:
            n = n * min(candidates, t.dims[0]) // t.dims[0]
        total += n
    return total


def _rescored_rows(proto) -> int:
    """The k of the rescored head's TopK (how many rows it gathers per token); 0 without one."""
    from onnx import numpy_helper

    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "TopK" and GATHERED_ONNX in node.name and node.input[1] in consts:
            return int(numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
    return 0


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
