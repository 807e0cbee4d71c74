"""The decode loop: prefill the new part of the prompt, then one token per step.

`Decoder.forward` runs the decoder graph over S new positions with one IOBinding kept for the life
of the decoder: the KV buffers are bound once as past and present (the graph writes them in place, on
the GPU when the cache lives there), the logits land in one preallocated host buffer, and each step
rebinds only inputs_embeds and the two length scalars (rebinding all 4 x layers KV names each step
cost ~0.5 ms of Python per token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache

PREFILL_CHUNK = 512  # bounds the activations of a long prompt; GQA continues from the cache


class Decoder:
    def __init__(self, session: ort.InferenceSession, io_names: dict[str, str], kv: KVCache,
                 vocab_size: int):
        self.session = session
        self.names = io_names
        self.kv = kv
        self._logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, vocab_size), np.float32))
        self._io = session.io_binding()
        kv.bind(self._io)
        self._io.bind_ortvalue_output(io_names["logits"], self._logits)
        self._feeds: tuple = ()  # the host arrays bound for the current step, kept alive until the next

    def forward(self, embeds: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """Run embeds [S, D] at the positions after the cache; record `keys`; return last logits [V].

        The logits are a view of a buffer the next call overwrites: copy them to keep them.
        """
        s = embeds.shape[0]
        total = self.kv.length + s
        if total > self.kv.max_length:
            raise ValueError(f"sequence of {total} positions exceeds the KV cache ({self.kv.max_length})")
        self._feeds = (np.ascontiguousarray(embeds[None], dtype=np.float32),
                       np.array([total - 1], dtype=np.int32), np.array(total, dtype=np.int32))
        for name, array in zip(("inputs_embeds", "seqlens_k", "total_sequence_length"), self._feeds, strict=True):
            self._io.bind_cpu_input(self.names[name], array)
        self.session.run_with_iobinding(self._io)
        self.kv.append(keys)
        return self._logits.numpy()[0, 0]

    def prefill(self, embeds: np.ndarray, keys: Sequence[Hashable], chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Run a prompt's new part in chunks; returns the logits of its last position."""
        logits = None
        for start in range(0, embeds.shape[0], chunk):
            logits = self.forward(embeds[start:start + chunk], keys[start:start + chunk])
        return logits


@dataclass
class StepStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_tokens: int = 0


def generate_tokens(decoder: Decoder, embed: Callable[[np.ndarray], np.ndarray],
                    prompt_embeds: np.ndarray, prompt_keys: Sequence[Hashable], prompt_ids: np.ndarray,
                    sample: Callable[[np.ndarray, np.ndarray, int], int], max_tokens: int,
                    stop_ids: set[int], stats: StepStats) -> Iterator[int]:
    """Yield generated token ids (a stop id is yielded too, then the loop ends).

    Reuses the longest cached prefix of the prompt; the caller closes the generator to cancel.
    """
    kv = decoder.kv
    reuse = kv.common_prefix(prompt_keys)
    reuse = min(reuse, len(prompt_keys) - 1)  # at least one position must run to get logits
    kv.truncate(reuse)
    stats.cached_tokens = reuse
    t0 = time.perf_counter()
    logits = decoder.prefill(prompt_embeds[reuse:], prompt_keys[reuse:])
    stats.prefill_seconds = time.perf_counter() - t0
    history = list(np.asarray(prompt_ids, dtype=np.int64))
    n_prompt = len(history)
    t0 = time.perf_counter()
    for step in range(max_tokens):
        token = sample(logits, np.asarray(history, dtype=np.int64), n_prompt)
        history.append(token)
        if step:
            stats.decode_seconds = time.perf_counter() - t0
        yield token
        if token in stop_ids or step == max_tokens - 1:
            return
        if step == 0:
            t0 = time.perf_counter()  # decode speed counts the steps after the first token
        logits = decoder.forward(embed(np.array([token])), [int(token)])
