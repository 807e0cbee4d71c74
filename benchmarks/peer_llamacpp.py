"""llama.cpp (through llama-cpp-python's low-level C API): quantize a GGUF, then prefill/decode.

The C API is used directly (not `Llama`), so no n_ctx x vocab score buffer is allocated on the
Python side: memory is llama.cpp's own. Context defaults are llama.cpp's (F16 KV cache, mmap).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np

from .common import Protocol, kv_bytes_per_position, peak_rss_bytes, prompt_ids, run_repeats

log = logging.getLogger("benchmarks.llamacpp")
FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def quantize(src: Path, dst: Path, qtype: str, threads: int) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) from an F16/BF16 GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[qtype])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({qtype}) failed with code {rc}")
    return dst


class _Context:
    def __init__(self, path: Path, proto: Protocol):
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        lc.llama_log_set(_silent_logger(), ctypes.c_void_p(0))
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = max(proto.context, proto.prompt_tokens)
        cp.n_threads = cp.n_threads_batch = proto.threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Run ids [S] after the cache; return the last position's logits [V] (a view)."""
        arr = (self.lc.llama_token * len(ids))(*[int(t) for t in ids])
        rc = self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        self.lc.llama_synchronize(self.ctx)
        ptr = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))


_LOGGER = []  # keeps the ctypes callback alive while llama.cpp holds it


def _silent_logger():
    import llama_cpp as lc

    if not _LOGGER:
        _LOGGER.append(lc.llama_log_callback(lambda level, text, data: None))
    return _LOGGER[0]


def measure(path: Path, proto: Protocol, hidden: dict) -> dict:
    """Prefill/decode speed of a GGUF with llama.cpp; `hidden` holds the decoder dims for the KV size."""
    ctx = _Context(path, proto)
    ids = prompt_ids(proto.prompt_tokens, ctx.n_vocab)

    def prefill(_):
        return ctx.decode(ids)

    def decode(logits):
        for _ in range(proto.decode_tokens - 1):
            logits = ctx.decode(np.array([int(np.argmax(logits))]))

    result = run_repeats(proto, prefill, decode, f"llama.cpp {path.name}", setup=ctx.clear)
    result["kv_bytes_per_position"] = kv_bytes_per_position(hidden["num_layers"], hidden["num_kv_heads"],
                                                            hidden["head_dim"], 2)  # F16 cache
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
