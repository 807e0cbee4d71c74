"""The decoder run for several sequences at once: N KV slots in one buffer, one step for many.

Every layer's keys (and values) are one host array [N, kv_heads, M, head_dim]; slot i is its row i.
Each slot is a `KVCache` over its own row (what it holds, its cached prefix) with its own batch-1
`Decoder` for prefill chunks. A decode step runs the contiguous span of slots that holds every
sequence being decoded, as one batch: GroupQueryAttention reads each row's length from `seqlens_k`
(its rotary position and where its new K/V row goes), and each weight is read once for all rows.

A slot inside the span with nothing to decode (free, or still prefilling) rides along at its own
length: the row written there lies past what the slot holds, and its next prefill overwrites it.
The CPU only: the slots are numpy arrays that ONNX Runtime reads and writes in place.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .errors import BundleError, InputError
from .generate import Decoder
from .kv_cache import KVCache
from .manifest import Manifest
from .sessions import kv_device, resolve_provider

log = logging.getLogger(__name__)


def takes_batches(session: ort.InferenceSession, io_names: dict[str, str]) -> bool:
    """Whether the decoder graph has a batch dimension (bundles exported before it have 1)."""
    shape = next(i.shape for i in session.get_inputs() if i.name == io_names["inputs_embeds"])
    return not isinstance(shape[0], int)


def why_not_batched(manifest: Manifest, provider: str) -> str | None:
    """Why this bundle cannot decode several sequences together on `provider` (None: it can)."""
    dec = manifest["decoder"]
    shape = next((v["shape"] for v in dec.get("inputs", []) if v["name"] == dec["io"]["inputs_embeds"]), [1])
    if not isinstance(shape[0], str):
        return "its decoder takes one sequence at a time (exported before batched decoding; re-export it)"
    if kv_device(resolve_provider(provider), np.dtype(dec.get("kv_dtype", "float32"))) != "cpu":
        return "decoding several sequences together runs with the KV cache in host memory (the CPU provider)"
    return None


@dataclass
class _SpanBinding:
    io: ort.IOBinding
    embeds: np.ndarray  # [B, 1, D], bound in place
    seqlens: np.ndarray  # [B]
    total: np.ndarray  # [] host scalar
    logits: np.ndarray  # [B, 1, V]


class SlotCaches:
    """N slots of `max_length` positions each, as rows of one buffer per layer and kind."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_length: int, slots: int, *,
                 io_names: dict[str, str], dtype=np.float32):
        self.dtype = np.dtype(dtype)
        shape = (slots, num_kv_heads, max_length, head_dim)
        # np.zeros: pages are mapped on first write, so memory grows with the positions actually used
        self.arrays = [(np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)) for _ in range(num_layers)]
        self.names = io_names
        self.max_length = max_length
        self.slots = [KVCache(num_layers, num_kv_heads, head_dim, max_length, io_names=io_names, dtype=self.dtype,
                              buffers=[(_view(k, i, i + 1), _view(v, i, i + 1)) for k, v in self.arrays])
                      for i in range(slots)]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.arrays)

    def bind_span(self, io: ort.IOBinding, lo: int, hi: int) -> None:
        for i, (k, v) in enumerate(self.arrays):
            kv = _view(k, lo, hi), _view(v, lo, hi)
            io.bind_ortvalue_input(self.names["past_key"].format(i=i), kv[0])
            io.bind_ortvalue_input(self.names["past_value"].format(i=i), kv[1])
            io.bind_ortvalue_output(self.names["present_key"].format(i=i), kv[0])
            io.bind_ortvalue_output(self.names["present_value"].format(i=i), kv[1])


def _view(array: np.ndarray, lo: int, hi: int) -> ort.OrtValue:
    """An OrtValue over rows lo..hi of `array` (no copy: ONNX Runtime writes into the array)."""
    return ort.OrtValue.ortvalue_from_numpy(array[lo:hi])


class BatchDecoder:
    """Decode steps for any set of slots, and a batch-1 `Decoder` per slot for their prefill."""

    def __init__(self, session: ort.InferenceSession, io_names: dict[str, str], caches: SlotCaches,
                 vocab_size: int, first: Decoder | None = None):
        """first: slot 0's Decoder when one exists already (the pipeline's own)."""
        if not takes_batches(session, io_names):
            raise BundleError("this bundle's decoder takes one sequence at a time; re-export it to decode "
                              "several at once (--parallel)")
        self.session, self.names, self.caches, self.vocab_size = session, io_names, caches, vocab_size
        self.hidden = next(i.shape[-1] for i in session.get_inputs() if i.name == io_names["inputs_embeds"])
        self.multi_logits = io_names.get("logits_start") in {i.name for i in session.get_inputs()}
        self.decoders = [first if (i == 0 and first is not None) else Decoder(session, io_names, kv, vocab_size)
                         for i, kv in enumerate(caches.slots)]
        self._spans: dict[tuple[int, int], _SpanBinding] = {}

    def _binding(self, lo: int, hi: int) -> _SpanBinding:
        if (lo, hi) not in self._spans:
            b = hi - lo
            span = _SpanBinding(self.session.io_binding(), np.zeros((b, 1, self.hidden), np.float32),
                                np.zeros(b, np.int32), np.zeros((), np.int32),
                                np.zeros((b, 1, self.vocab_size), np.float32))
            self.caches.bind_span(span.io, lo, hi)
            for name, array in (("inputs_embeds", span.embeds), ("seqlens_k", span.seqlens),
                                ("total_sequence_length", span.total)):
                span.io.bind_ortvalue_input(self.names[name], ort.OrtValue.ortvalue_from_numpy(array))
            if self.multi_logits:
                span.io.bind_cpu_input(self.names["logits_start"], np.array([-1], np.int64))
            span.io.bind_ortvalue_output(self.names["logits"], ort.OrtValue.ortvalue_from_numpy(span.logits))
            self._spans[lo, hi] = span
        return self._spans[lo, hi]

    def step(self, rows: dict[int, tuple[np.ndarray, Hashable]]) -> dict[int, np.ndarray]:
        """One position for each slot in `rows` (slot -> (embedding [D], cache key)); returns each
        slot's logits [V] (views of a buffer the next step over the same span overwrites)."""
        slots = self.caches.slots
        for i in rows:
            if slots[i].length >= slots[i].max_length:
                raise ValueError(f"slot {i}: the KV cache is full ({slots[i].max_length} positions)")
        lo, hi = min(rows), max(rows) + 1
        span = self._binding(lo, hi)
        for b, i in enumerate(range(lo, hi)):
            kv = slots[i]
            if i in rows:
                span.embeds[b, 0] = rows[i][0]
            elif kv.length >= kv.max_length:  # a full idle slot gives up its last position to ride along
                kv.truncate(kv.max_length - 1)
            span.seqlens[b] = kv.length  # the new row's position = total length - 1
        span.total[()] = int(span.seqlens.max()) + 1
        self.session.run_with_iobinding(span.io)
        out = {}
        for i, (_, key) in rows.items():
            slots[i].append([key])
            out[i] = span.logits[i - lo, 0]
        return out

    def prefill(self, slot: int, embeds: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """Run prompt rows at the positions after slot `slot`'s cache; the last position's logits."""
        return self.decoders[slot].forward(embeds, keys)


def slot_decoder(manifest: Manifest, session: ort.InferenceSession, context_length: int, parallel: int,
                 kv_device: str) -> BatchDecoder:
    """`parallel` slots of `context_length` positions for the bundle's decoder session (logs their size)."""
    dec = manifest["decoder"]
    if kv_device != "cpu":
        raise InputError("decoding several sequences together (parallel > 1) runs on the CPU; this pipeline "
                         f"keeps its KV cache on {kv_device}", param="parallel")
    caches = SlotCaches(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], context_length, parallel,
                        io_names=dec["io"], dtype=np.dtype(dec.get("kv_dtype", "float32")))
    log.info("KV cache: %d slots x %d positions = %.0f MiB (taken as they fill)", parallel, context_length,
             caches.nbytes / 2**20)
    return BatchDecoder(session, dec["io"], caches, dec["vocab_size"])
