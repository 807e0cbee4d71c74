"""The decode loop: prefill the new part of the prompt, then one token per step.

`Decoder.forward` runs the decoder graph over S new positions with one IOBinding kept for the life
of the decoder. The KV buffers are bound once as past and present: the graph writes them in place,
on the GPU when the cache lives there. The logits land in one preallocated buffer on the cache's
device. A decode step (S = 1) copies its embedding row and `seqlens_k` into preallocated buffers on
that device. So every address a step touches stays fixed, which is what a CUDA graph replay needs.
Only a prefill chunk binds its embeddings from host memory.
`total_sequence_length` is always a host scalar: GroupQueryAttention reads it on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache

PREFILL_CHUNK = 512  # bounds the activations of a long prompt; GQA continues from the cache
DECODE_GRAPH_ID = "1"  # ORT's name for the one captured CUDA graph: the S = 1 decode step


class Decoder:
    def __init__(self, session: ort.InferenceSession, io_names: dict[str, str], kv: KVCache,
                 vocab_size: int, *, cuda_graph: bool = False):
        """cuda_graph: the session was created with CUDA graphs on (`create_session(cuda_graph=True)`).
        Decode steps then replay one captured graph, and prefill chunks run without capture."""
        self.session = session
        self.names = io_names
        self.kv = kv
        device = kv.device
        hidden = next(i.shape[-1] for i in session.get_inputs() if i.name == io_names["inputs_embeds"])
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self._step_embeds = alloc((1, 1, hidden), np.float32, device, kv.device_id)
        self._seqlens = alloc((1,), np.int32, device, kv.device_id)
        self._total = alloc((), np.int32, "cpu", 0)
        self._logits = alloc((1, 1, vocab_size), np.float32, device, kv.device_id)
        self._io = session.io_binding()
        kv.bind(self._io)
        self._io.bind_ortvalue_input(io_names["seqlens_k"], self._seqlens)
        self._io.bind_ortvalue_input(io_names["total_sequence_length"], self._total)
        self._io.bind_ortvalue_output(io_names["logits"], self._logits)
        self._prefill_embeds = None  # the host array bound for a prefill chunk, kept alive while bound
        self.cuda_graph = cuda_graph
        self._step_options = self._prefill_options = None
        if cuda_graph:
            self._step_options, self._prefill_options = ort.RunOptions(), ort.RunOptions()
            self._step_options.add_run_config_entry("gpu_graph_id", DECODE_GRAPH_ID)
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # -1: run, do not capture

    def forward(self, embeds: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """Run embeds [S, D] at the positions after the cache; record `keys`; return last logits [V].

        On the CPU the logits are a view of a buffer the next call overwrites: copy them to keep them.
        """
        s = embeds.shape[0]
        total = self.kv.length + s
        if total > self.kv.max_length:
            raise ValueError(f"sequence of {total} positions exceeds the KV cache ({self.kv.max_length})")
        rows = np.ascontiguousarray(embeds[None], dtype=np.float32)
        if s == 1:
            self._step_embeds.update_inplace(rows)
            self._io.bind_ortvalue_input(self.names["inputs_embeds"], self._step_embeds)
            options = self._step_options
        else:
            self._prefill_embeds = rows
            self._io.bind_cpu_input(self.names["inputs_embeds"], rows)
            options = self._prefill_options
        self._seqlens.update_inplace(np.array([total - 1], dtype=np.int32))
        # A captured step must not depend on a host value that changes: GroupQueryAttention then reads
        # the real length from seqlens_k on the device, and total_sequence_length is the buffer's.
        host_total = self.kv.max_length if (s == 1 and self.cuda_graph) else total
        self._total.update_inplace(np.array(host_total, dtype=np.int32))
        self.session.run_with_iobinding(self._io, options)
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


def prefill_prompt(decoder: Decoder, prompt_embeds: np.ndarray, prompt_keys: Sequence[Hashable],
                   stats: StepStats, reuse_prefix: bool = True) -> np.ndarray:
    """Run the part of the prompt the cache does not hold (all of it when `reuse_prefix` is False);
    return the logits of its last position (a view the next decoder call overwrites)."""
    kv = decoder.kv
    reuse = kv.common_prefix(prompt_keys) if reuse_prefix else 0
    reuse = min(reuse, len(prompt_keys) - 1)  # at least one position must run to get logits
    kv.truncate(reuse)
    stats.cached_tokens = reuse
    t0 = time.perf_counter()
    logits = decoder.prefill(prompt_embeds[reuse:], prompt_keys[reuse:])
    stats.prefill_seconds = time.perf_counter() - t0
    return logits


def generate_tokens(decoder: Decoder, embed: Callable[[np.ndarray], np.ndarray],
                    prompt_embeds: np.ndarray, prompt_keys: Sequence[Hashable], prompt_ids: np.ndarray,
                    sample: Callable[[np.ndarray, np.ndarray, int], int], max_tokens: int,
                    stop_ids: set[int], stats: StepStats, reuse_prefix: bool = True) -> Iterator[int]:
    """Yield generated token ids (a stop id is yielded too, then the loop ends).

    Reuses the longest cached prefix of the prompt unless `reuse_prefix` is False; the caller closes
    the generator to cancel.
    """
    logits = prefill_prompt(decoder, prompt_embeds, prompt_keys, stats, reuse_prefix)
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
