"""A tiny ONNX graph builder that streams weights to an external-data file as they are added.

Why by hand: onnx.helper builds the graph fine, but `onnx.save(..., save_as_external_data=True)` needs
every initializer in memory at once (the 8B model would need tens of GB). Here each initializer is
appended to `<graph>.onnx.data` the moment it is added and only a reference stays in the proto,
so exporting holds one tensor at a time.

Names are deterministic and hierarchical (`/model/layers.3/attn/qkv_proj/MatMulNBits`), the style of
onnxruntime-genai's model builder: a node's outputs are `{node name}/output_{i}`, constants are
interned as `/model/constants/{dtype}/{shape}/{value}`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MS_DOMAIN = "com.microsoft"
_ALIGN = 64 * 1024  # large tensors start on 64 KiB boundaries so ONNX Runtime can memory-map them
_INLINE_LIMIT = 1024  # bytes; smaller tensors live inside the .onnx file

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class GraphBuilder:
    """Collects nodes and I/O; writes initializers to `data_path` as they come."""

    def __init__(self, name: str, data_path: str | Path | None = None):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[str, str] = {}
        self._data_path = Path(data_path) if data_path else None
        self._data = open(self._data_path, "wb") if self._data_path else None  # noqa: SIM115
        self.weight_bytes = 0
        # External tensors the runtime should load into process memory itself (see `initializer`).
        self.resident: list[dict] = []

    # -- graph I/O ---------------------------------------------------------------------------
    def input(self, name: str, dtype: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    # -- initializers ------------------------------------------------------------------------
    def initializer(self, name: str, array: np.ndarray, resident: bool = False) -> str:
        """Add a weight; big ones go straight to the external data file (then the array can be freed).

        resident: a table read a few scattered rows at a time (Gather). ONNX Runtime memory-maps aligned
        external data, so such rows would be paged in from disk one fault at a time during decoding; the
        bundle's manifest lists these tensors (file, offset, dtype, shape) and the runtime hands them to
        ONNX Runtime from its own memory (`SessionOptions.add_initializer`). Other ONNX Runtime users
        still get a working graph."""
        if name in self._names:
            raise ValueError(f"duplicate initializer name {name}")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        self.weight_bytes += array.nbytes
        if self._data is None or array.nbytes <= _INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = self._data.tell()
        pad = (-offset) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(array.tobytes())
        t = TensorProto(name=name, data_type=NP_TO_ONNX[array.dtype], dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self._data_path.name), ("offset", str(offset)),
                           ("length", str(array.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(t)
        if resident:
            self.resident.append({"name": name, "file": self._data_path.name, "offset": offset,
                                  "length": array.nbytes, "dtype": array.dtype.name, "shape": list(array.shape)})
        return name

    def const(self, value, dtype=np.int64) -> str:
        """An interned small constant (scalars, shapes, axes)."""
        array = np.asarray(value, dtype=dtype)
        flat = "_".join(str(v) for v in array.reshape(-1).tolist())
        shape = "x".join(str(d) for d in array.shape) or "scalar"
        key = f"/model/constants/{array.dtype.name}/{shape}/{flat}"
        if key not in self._consts:
            self._consts[key] = self.initializer(key, array)
        return self._consts[key]

    # -- nodes -------------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, *, n_out: int = 1, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        """Add one node named `name`; returns its output names (`{name}/output_{i}` unless given)."""
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = outputs or [f"{name}/output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs

    def op(self, op: str, inputs: list[str], name: str, **kw) -> str:
        """Single-output shorthand for `node`."""
        return self.node(op, inputs, name, **kw)[0]

    # -- saving ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the .onnx file (the data file is already written). Returns the path."""
        if self._data:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()
            self._data = None
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="minicpmo-onnx",
        )
        model.ir_version = 10
        path = Path(path)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
        return path
