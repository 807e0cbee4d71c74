"""The decoder's KV cache: one preallocated buffer per layer for keys and one for values, bound as
both `past_key_values.{i}.*` and `present.{i}.*` so GroupQueryAttention writes the new positions in place.

It also remembers which token (or which image / audio row) sits at each position: a new prompt that
starts with the same content re-uses those positions instead of running their prefill again.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import onnxruntime as ort


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 io_names: dict[str, str], device: str = "cpu", device_id: int = 0,
                 dtype=np.float32, buffers: list[tuple[ort.OrtValue, ort.OrtValue]] | None = None):
        """buffers: per layer (keys, values) [1, kv_heads, max_length, head_dim] to use instead of new
        ones (the scheduler's slots: rows of one batched buffer)."""
        self.max_length = max_length
        self.num_layers = num_layers
        self._names = io_names
        self.dtype = np.dtype(dtype)
        self.device, self.device_id = device, device_id
        shape = (1, num_kv_heads, max_length, head_dim)
        self._buffers = buffers or [
            (ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id),
             ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id))
            for _ in range(num_layers)
        ]
        self.keys: list[Hashable] = []  # what sits at each filled position

    @property
    def length(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        k, _ = self._buffers[0]
        return 2 * self.num_layers * int(np.prod(k.shape())) * self.dtype.itemsize

    def common_prefix(self, keys: Sequence[Hashable]) -> int:
        """How many leading positions of `keys` are already in the cache."""
        n = 0
        for a, b in zip(self.keys, keys, strict=False):
            if a != b:
                break
            n += 1
        return n

    def truncate(self, length: int) -> None:
        """Forget positions >= length (their buffer rows are overwritten by the next prefill)."""
        del self.keys[length:]

    def reset(self) -> None:
        self.keys.clear()

    def bind(self, io: ort.IOBinding) -> None:
        """Bind every layer's buffer as past and present."""
        for i, (k, v) in enumerate(self._buffers):
            io.bind_ortvalue_input(self._names["past_key"].format(i=i), k)
            io.bind_ortvalue_input(self._names["past_value"].format(i=i), v)
            io.bind_ortvalue_output(self._names["present_key"].format(i=i), k)
            io.bind_ortvalue_output(self._names["present_value"].format(i=i), v)

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of layer i's keys and values at the filled positions, [kv_heads, length, head_dim]
        (after rotary, as attention reads them; the export calibrates an int8 cache from these)."""
        k, v = self._buffers[i]
        return k.numpy()[0, :, :self.length].copy(), v.numpy()[0, :, :self.length].copy()

    def append(self, keys: Sequence[Hashable]) -> None:
        """Record that the positions after the current length now hold `keys`."""
        if self.length + len(keys) > self.max_length:
            raise ValueError(f"KV cache overflow: {self.length} + {len(keys)} > {self.max_length}")
        self.keys.extend(keys)
