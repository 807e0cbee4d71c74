"""What quantization costs on trained weights, measured as llama.cpp's `llama-perplexity --kl-divergence`.

    python -m benchmarks.quality --reference FP32_BUNDLE --ours NAME=BUNDLE --gguf NAME=FILE \
        --ortgenai NAME=DIR [--chunks 32] [--json]

The corpus: 16 chunks of 512 tokens of Python source and 16 of English prose, from text files that
ship with CPython (CODE_FILES: standard-library modules; PROSE_TOPICS: pydoc's topic texts, the
language reference in plain text). Each chunk starts a quarter of the way into its text. Every engine
runs each chunk from an empty cache and is scored on the second half, as llama-perplexity does: the
logits at positions 256..510 predict tokens 257..511 (255 per chunk). Against the reference's logits
(our fp32 export of the same checkpoint, kept on disk as float32): perplexity, mean KL divergence
(reference || engine, over the whole vocabulary) with its standard error, its median, 99th percentile
and maximum, and how often both pick the same top token. CALIBRATION_* name other files, for
anything that calibrates (the int8 KV cache's scales, an importance matrix): never the corpus.

The corpus depends on the Python version's standard library: its sha256 (over the token ids) is
printed with the results, so two runs compare only when it matches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from minicpmo.runtime.bench import isa

from .common import Protocol, setup_logging

log = logging.getLogger("benchmarks.quality")
CHUNK_TOKENS = 512
FIRST_SCORED = CHUNK_TOKENS // 2  # logits from here on are scored (the first half is context)
CODE_FILES = ("textwrap.py", "heapq.py", "fractions.py", "statistics.py", "functools.py", "dataclasses.py",
              "json/decoder.py", "json/encoder.py", "csv.py", "shlex.py", "difflib.py", "argparse.py",
              "enum.py", "pprint.py", "string.py", "tokenize.py")
PROSE_TOPICS = ("specialnames", "compound", "types", "string-methods", "formatstrings", "typesseq",
                "typesmapping", "customization", "attribute-access", "comparisons", "assignment",
                "execmodel", "import", "try", "calls", "function")
CALIBRATION_CODE_FILES = ("calendar.py", "contextlib.py", "random.py", "selectors.py", "typing.py", "uuid.py",
                          "queue.py", "graphlib.py")
CALIBRATION_PROSE_TOPICS = ("debugger", "strings", "sequence-types", "numeric-types", "naming",
                            "operator-summary", "identifiers", "async", "objects")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _texts(files: tuple[str, ...], topics: tuple[str, ...]) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics as pydoc_topics

    return ([(f"code:{f}", (_stdlib() / f).read_text(encoding="utf-8")) for f in files]
            + [(f"prose:{t}", pydoc_topics[t]) for t in topics])


def corpus(tokenizer, n_chunks: int | None = None) -> list[tuple[str, np.ndarray]]:
    """[(source, ids [512])]: code and prose alternating, so any prefix of the list keeps both."""
    code = _chunks(tokenizer, _texts(CODE_FILES, ()))
    prose = _chunks(tokenizer, _texts((), PROSE_TOPICS))
    mixed = [c for pair in zip(code, prose, strict=True) for c in pair]
    return mixed[:n_chunks] if n_chunks else mixed


def _chunks(tokenizer, texts) -> list[tuple[str, np.ndarray]]:
    out = []
    for name, text in texts:
        ids = np.array(tokenizer.encode(text), dtype=np.int64)
        if len(ids) < CHUNK_TOKENS:
            raise ValueError(f"{name}: {len(ids)} tokens, a chunk needs {CHUNK_TOKENS}")
        start = min(len(ids) // 4, len(ids) - CHUNK_TOKENS)
        out.append((name, ids[start:start + CHUNK_TOKENS]))
    return out


def calibration_text() -> str:
    """Code and prose unlike the corpus (other modules, other topics), for calibrating steps."""
    return "\n\n".join(text for _, text in _texts(CALIBRATION_CODE_FILES, CALIBRATION_PROSE_TOPICS))


def corpus_digest(chunks) -> str:
    h = hashlib.sha256()
    for _, ids in chunks:
        h.update(ids.astype("<i8").tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- engines: ids [512] -> logits [255, V]

class OursEngine:
    def __init__(self, bundle: Path, threads: int):
        from .peer_ours import DecoderOnly

        self.d = DecoderOnly(bundle, threads, CHUNK_TOKENS + 8)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        d = self.d
        d.kv.reset()
        d.decoder.prefill(d.embed(ids[:FIRST_SCORED]), ids[:FIRST_SCORED].tolist())
        rest = ids[FIRST_SCORED:-1]
        return d.decoder.forward_all(d.embed(rest), rest.tolist()).copy()


class LlamaCppEngine:
    """llama.cpp through its C API: one batch per chunk with logits requested for the scored half."""

    def __init__(self, gguf: Path, threads: int):
        from .peer_llamacpp import _Context

        self.ctx = _Context(gguf, Protocol(CHUNK_TOKENS, 8, 1, threads))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        lc, ctx = self.ctx.lc, self.ctx
        ctx.clear()
        n = len(ids) - 1
        batch = lc.llama_batch_init(n, 0, 1)
        try:
            for i in range(n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(ids[i]), i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= FIRST_SCORED
            batch.n_tokens = n
            if lc.llama_decode(ctx.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            lc.llama_synchronize(ctx.ctx)
            rows = [np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.ctx, i), shape=(ctx.n_vocab,))
                    for i in range(FIRST_SCORED, n)]
            return np.stack(rows).astype(np.float32)
        finally:
            lc.llama_batch_free(batch)


class OrtGenaiEngine:
    """onnxruntime-genai's exported graph run by ONNX Runtime itself: its generator returns only the
    last position's logits, while the graph computes every position's (the same numbers)."""

    def __init__(self, model_dir: Path, threads: int):
        import onnxruntime as ort

        cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(model_dir / cfg["decoder"]["filename"]), so,
                                            providers=["CPUExecutionProvider"])
        self.kv_heads, self.head_dim = cfg["decoder"]["num_key_value_heads"], cfg["decoder"]["head_size"]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids) - 1
        feeds = {}
        for i in self.session.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = ids[None, :n]
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, n), dtype=np.int64)
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(n, dtype=np.int64)[None]
            elif i.name.startswith("past_key_values"):
                feeds[i.name] = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
            else:
                raise RuntimeError(f"unknown onnxruntime-genai input {i.name}")
        out = self.session.run(["logits"], feeds)[0]
        return out[0, FIRST_SCORED:n].astype(np.float32)


# ---------------------------------------------------------------- scoring

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def score(ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored token: the engine's NLL of the true next token, KL(ref || engine), same top-1."""
    lp_ref, lp = log_softmax(ref_logits), log_softmax(logits)
    kl = (np.exp(lp_ref) * (lp_ref - lp)).sum(-1)
    return {"nll": -lp[np.arange(len(targets)), targets], "kl": np.maximum(kl, 0.0),
            "same_top1": ref_logits.argmax(-1) == logits.argmax(-1)}


def summary(per_token: dict[str, np.ndarray]) -> dict:
    kl = per_token["kl"]
    return {"tokens": int(kl.size), "perplexity": round(math.exp(per_token["nll"].mean()), 4),
            "kl_mean": round(float(kl.mean()), 5), "kl_mean_stderr": round(float(kl.std() / math.sqrt(kl.size)), 5),
            "kl_median": round(float(np.median(kl)), 5), "kl_p99": round(float(np.percentile(kl, 99)), 4),
            "kl_max": round(float(kl.max()), 3), "same_top1": round(float(per_token["same_top1"].mean()), 4)}


class Reference:
    """The reference engine's scored logits for every chunk, computed once, kept as a float32 memmap."""

    def __init__(self, bundle: Path, chunks, threads: int, cache: Path):
        self.path = cache / f"reference-{corpus_digest(chunks)}.f32"
        vocab = json.loads((bundle / "manifest.json").read_text())["decoder"]["vocab_size"]
        shape = (len(chunks), CHUNK_TOKENS - 1 - FIRST_SCORED, vocab)
        done = self.path.with_suffix(".done")
        if not (done.is_file() and done.read_text() == str(bundle.resolve())):
            engine = OursEngine(bundle, threads)
            out = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=shape)
            for i, (name, ids) in enumerate(chunks):
                out[i] = engine.logits(ids)
                log.info("reference %d/%d (%s)", i + 1, len(chunks), name)
            out.flush()
            del out, engine
            done.write_text(str(bundle.resolve()))
        self.logits = np.load(self.path, mmap_mode="r")
        if self.logits.shape != shape:
            raise RuntimeError(f"{self.path}: shape {self.logits.shape}, expected {shape}")


def evaluate(engine, reference: Reference, chunks, name: str) -> dict:
    parts = {"nll": [], "kl": [], "same_top1": []}
    t0 = time.perf_counter()
    for i, (_, ids) in enumerate(chunks):
        rows = engine.logits(ids)
        ref = np.asarray(reference.logits[i])
        vocab = min(rows.shape[-1], ref.shape[-1])  # GGUF/HF copies pad the vocabulary: score the shared ids
        s = score(ref[:, :vocab], rows[:, :vocab], ids[FIRST_SCORED + 1:])
        for k in parts:
            parts[k].append(s[k])
        log.info("%s: chunk %d/%d, mean KL so far %.4f", name, i + 1, len(chunks),
                 float(np.concatenate(parts["kl"]).mean()))
    per_token = {k: np.concatenate(v) for k, v in parts.items()}
    kinds = np.array([src.split(":")[0] for src, _ in chunks]).repeat(len(parts["kl"][0]))
    result = summary(per_token) | {"seconds": round(time.perf_counter() - t0, 1)}
    for kind in ("code", "prose"):
        sel = kinds == kind
        result[kind] = summary({k: v[sel] for k, v in per_token.items()})
    return result


# Export settings measured by `--rows` (ExportOptions fields; every row exports without audio).
ROWS = {
    **{f"b{b}-a{a}": {"block_size": b, "accuracy_level": a} for a in (4, 0) for b in (32, 64, 128, 256)},
    "b128-a4-head-int8": {"lm_head_precision": "int8"},
    "b128-a4-head-int4": {"lm_head_precision": "int4"},
    "b128-a4-head-fp32": {"lm_head_precision": "fp32"},
    "b128-a4-head-int2+int8": {"lm_head_precision": "int2+int8"},
    "b128-a4-kv8": {"kv_cache": "int8", "kv_calibration_text": "CALIBRATION"},
    "int8-b128-a4": {"precision": "int8"},
    "speed-first": {"block_size": 256, "kv_cache": "int8", "kv_calibration_text": "CALIBRATION",
                    "lm_head_precision": "int2+int8"},
    # remedies: the importance-weighted range search, finer tensors where the loss is
    "b128-a4-imatrix": {"imatrix_text": "CALIBRATION"},
    "b64-a4-imatrix": {"block_size": 64, "imatrix_text": "CALIBRATION"},
    "b256-a4-imatrix": {"block_size": 256, "imatrix_text": "CALIBRATION"},
    "b128-a4-down8": {"tensor_precision": (("layers.*/mlp/down_proj", "int8"),)},
    "b128-a4-qkv8": {"tensor_precision": (("layers.*/attn/qkv_proj", "int8"),)},
    "b128-a4-ends8": {"tensor_precision": (("layers.0/*", "int8"), ("layers.1/*", "int8"), ("layers.26/*", "int8"),
                                           ("layers.27/*", "int8"))},
}


def export_row(checkpoint: Path, work: Path, row: str) -> Path:
    """The row's bundle under `work` (exported unless already there)."""
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = work / row
    if (out / "manifest.json").is_file():
        return out
    opts = dict(ROWS[row])
    for key in ("kv_calibration_text", "imatrix_text"):
        if opts.get(key) == "CALIBRATION":  # the calibration set: never the corpus
            text = work / "calibration.txt"
            work.mkdir(parents=True, exist_ok=True)
            text.write_text(calibration_text(), encoding="utf-8")
            opts[key] = str(text)
    t0 = time.perf_counter()
    export_bundle(checkpoint, out, ExportOptions(audio=False, tts=False, **opts), overwrite=True,
                  progress=lambda stage, i, n, *unit: log.debug("%s %s %d/%d", row, stage, i, n))
    log.info("exported %s in %.0f s", row, time.perf_counter() - t0)
    return out


def _named(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s).name, s
        out.append((name, Path(path)))
    return out


def markdown(result: dict) -> str:
    lines = [f"Corpus {result['corpus_sha256']} ({result['chunks']} chunks x {CHUNK_TOKENS} tokens, "
             f"{result['scored_tokens']} scored); reference perplexity {result['reference_perplexity']:.3f}.", "",
             "| engine | perplexity | mean KL (± s.e.) | median KL | p99 KL | max KL | same top-1 | code / prose mean KL |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["engines"].items():
        lines.append(f"| {name} | {r['perplexity']:.3f} | {r['kl_mean']:.4f} ± {r['kl_mean_stderr']:.4f} | "
                     f"{r['kl_median']:.4f} | {r['kl_p99']:.3f} | {r['kl_max']:.2f} | {100 * r['same_top1']:.1f}% | "
                     f"{r['code']['kl_mean']:.4f} / {r['prose']['kl_mean']:.4f} |")
    return "\n".join(lines)


def run(reference: Path, ours, ggufs, ortgenai, chunks_n: int, threads: int, cache: Path,
        rows: list[str] = (), checkpoint: Path | None = None, keep: set[str] = frozenset()) -> dict:
    from minicpmo.runtime.tokenizer import Tokenizer

    tok = Tokenizer(reference / "tokenizer.json")
    chunks = corpus(tok, chunks_n)
    cache.mkdir(parents=True, exist_ok=True)
    ref = Reference(reference, chunks, threads, cache)
    ref_ppl = math.exp(np.mean(np.concatenate([
        -log_softmax(np.asarray(ref.logits[i]))[np.arange(len(ids) - 1 - FIRST_SCORED), ids[FIRST_SCORED + 1:]]
        for i, (_, ids) in enumerate(chunks)])))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "isa": isa(), "python": sys.version.split()[0],
              "corpus_sha256": corpus_digest(chunks), "chunks": len(chunks),
              "scored_tokens": len(chunks) * (CHUNK_TOKENS - 1 - FIRST_SCORED), "threads": threads,
              "reference": str(reference), "reference_perplexity": round(ref_ppl, 4), "engines": {}}
    for row in rows:  # export, measure, and (unless kept) delete: one 1.5B bundle on disk at a time
        bundle = export_row(checkpoint, cache / "rows", row)
        result["engines"][row] = evaluate(OursEngine(bundle, threads), ref, chunks, row) | {
            "path": str(bundle), "options": ROWS[row]}
        if row not in keep:
            shutil.rmtree(bundle)
    for cls, specs in ((OursEngine, ours), (LlamaCppEngine, ggufs), (OrtGenaiEngine, ortgenai)):
        for name, path in specs:
            engine = cls(path, threads)
            result["engines"][name] = evaluate(engine, ref, chunks, name) | {"path": str(path)}
            del engine
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="the fp32 bundle whose logits are the yardstick")
    p.add_argument("--ours", action="append", default=[], help="NAME=BUNDLE (repeatable)")
    p.add_argument("--gguf", action="append", default=[], help="NAME=FILE for llama.cpp (repeatable)")
    p.add_argument("--ortgenai", action="append", default=[], help="NAME=DIR (repeatable)")
    p.add_argument("--chunks", type=int, default=None, help="the first N chunks only (default: all 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path("/tmp/minicpmo-quality"), help="where the reference logits go")
    p.add_argument("--checkpoint", type=Path, help="with --rows: the checkpoint the rows are exported from")
    p.add_argument("--rows", default="", help=f"comma list of export settings to measure: {', '.join(ROWS)}")
    p.add_argument("--keep", default="", help="comma list of rows whose bundles stay (under CACHE/rows)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    if rows and not a.checkpoint:
        p.error("--rows needs --checkpoint")
    if unknown := sorted(set(rows) - set(ROWS)):
        p.error(f"unknown rows {unknown}")
    setup_logging()
    log.info("host ISA: %s", isa())
    result = run(a.reference, _named(a.ours), _named(a.gguf), _named(a.ortgenai), a.chunks, a.threads, a.cache,
                 rows, a.checkpoint, set(a.keep.split(",")))
    print(json.dumps(result, indent=1) if a.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
