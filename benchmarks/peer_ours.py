"""Ours: `minicpmo export` (int4 MatMulNBits), then the decoder graph alone with the runtime's own
Decoder / KVCache / EmbeddingTable: the objects the pipeline uses for every generated token.

Only the decoder session and the (memory-mapped) embedding table are loaded, as the peers hold only
the LLM; `minicpmo bench` (runtime/bench.py) measures the whole bundle (vision, TTFT) instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from .common import Protocol, kv_bytes_per_position, prompt_ids, run_repeats

log = logging.getLogger("benchmarks.ours")
DECODER_FILES = ("decoder.onnx", "decoder.onnx.data", "embed_tokens.npy")


def export(ckpt: Path, out: Path, *, block_size: int = 32, accuracy_level: int = 4,
           head_precision: str | None = None, kv_cache: str | None = None, timeout_s: float | None = None) -> dict:
    """`minicpmo export CKPT -o OUT --precision int4 ...` in its own process (no audio)."""
    from .procs import run_child

    exe = Path(sys.executable).parent / "minicpmo"
    cmd = [str(exe), "export", str(ckpt), "-o", str(out), "--precision", "int4", "--block-size", str(block_size),
           "--accuracy-level", str(accuracy_level), "--no-audio", "--overwrite"]
    if head_precision:
        cmd += ["--lm-head-precision", head_precision]
    if kv_cache:
        cmd += ["--kv-cache", kv_cache]
    log.info("running %s", " ".join(cmd))
    res = run_child(cmd, timeout_s=timeout_s, quiet=True)
    res["command"] = " ".join(cmd)
    res["ok"] = res["returncode"] == 0 and (out / "manifest.json").is_file()
    if not res["ok"]:
        tail = [ln for ln in res["output_tail"].splitlines() if ln.strip()]
        res["error"] = f"exit code {res['returncode']}: {tail[-1] if tail else 'no output'}"
    return res


class DecoderOnly:
    """The bundle's decoder session, KV cache and embedding table, as Pipeline builds them."""

    def __init__(self, bundle: Path, threads: int, context: int, profile_prefix: str | None = None,
                 session_config: dict[str, str] | None = None):
        from minicpmo.runtime.generate import Decoder
        from minicpmo.runtime.kv_cache import KVCache
        from minicpmo.runtime.manifest import load_manifest
        from minicpmo.runtime.sessions import EmbeddingTable, create_decoder_session

        m = load_manifest(bundle)
        dec, emb = m["decoder"], m["embeddings"]
        self.info = dec
        self.embed = EmbeddingTable(m.path(emb["file"]), emb["dtype"], emb["shape"])
        self.session = create_decoder_session(m, "cpu", threads, profile_prefix=profile_prefix,
                                              config=session_config)
        self.kv = KVCache(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], context, io_names=dec["io"],
                          dtype=np.dtype(dec.get("kv_dtype", "float32")))
        self.decoder = Decoder(self.session, dec["io"], self.kv, dec["vocab_size"])

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.decoder.prefill(self.embed(ids), [int(t) for t in ids])

    def step(self, logits: np.ndarray) -> np.ndarray:
        """Greedy: the argmax of `logits` becomes the next input; returns its logits."""
        token = int(np.argmax(logits))
        return self.decoder.forward(self.embed(np.array([token])), [token])


def measure(bundle: Path, proto: Protocol) -> dict:
    from minicpmo.runtime.bench import header, peak_rss_bytes

    d = DecoderOnly(bundle, proto.threads, proto.context)
    ids = prompt_ids(proto.prompt_tokens, d.info["vocab_size"])

    def decode(logits):
        for _ in range(proto.decode_tokens - 1):
            logits = d.step(logits)

    result = run_repeats(proto, lambda _: d.prefill(ids), decode, f"ours {bundle.name}", setup=d.kv.reset)
    result["kv_bytes_per_position"] = kv_bytes_per_position(d.info["num_layers"], d.info["num_kv_heads"],
                                                            d.info["head_dim"], d.kv.dtype.itemsize)
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["header"] = header(proto.threads)
    return result
