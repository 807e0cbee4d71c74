"""Grammar-constrained decoding: what each candidate library costs per token at MiniCPM-o's vocabulary.

    python -m benchmarks.grammar [--tokenizer DIR] [--repeats 5] [--bundle DIR [--threads 2]]

For llguidance, outlines-core and xgrammar (each where installed), and for this runtime's own path
(runtime.constrain in the Sampler): the time to build the library's tokenizer index (once per
process), to compile a JSON schema (once per request), and per generated token to compute the mask
of allowed tokens, apply it to a float32 logits row [V] with numpy and advance the state. The reply
fed is a fixed valid document of the schema, tokenized by the tokenizer, so every library walks the
same path. Then what `logprobs` costs per token. V is 151,700 (the decoder's logits width): the real
tokenizer when --tokenizer is given (or ../shared/reference/tokenizer exists), else the synthetic
tokenizer grown to the same size (`export.synth_tokenizer.grown_bpe`). Per-token figures are over all
--repeats walks. The peers are not dependencies of the project: `pip install outlines-core==0.2.14`,
and `pip install --no-deps xgrammar==0.2.9 apache-tvm-ffi` next to the bench extra's torch and
transformers (xgrammar imports both; its declared triton dependency is not needed on a CPU).
With --bundle, decode speed end to end too: the bundle's greedy reply to an extraction prompt without
and with the schema, in alternating rounds (ms per decode step; random weights give other replies
with and without the schema, but a step's cost does not depend on its token).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from minicpmo.runtime.bench import isa

from .common import setup_logging

log = logging.getLogger("benchmarks")
VOCAB = 151_700  # the decoder's logits width (config vocab_size)
REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tokenizer"  # as tests/conftest.py
SCHEMA = {  # a receipt, the kind of document extraction the feature is for
    "type": "object",
    "properties": {
        "merchant": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {"type": "array", "maxItems": 8, "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
                           "price": {"type": "number"}},
            "required": ["name", "quantity", "price"], "additionalProperties": False}},
        "total": {"type": "number"},
        "paid": {"type": "boolean"},
    },
    "required": ["merchant", "date", "currency", "items", "total", "paid"],
    "additionalProperties": False,
}
DOCUMENT = {"merchant": "Corner Bakery & Cafe", "date": "2026-03-14", "currency": "EUR",
            "items": [{"name": "Sourdough loaf", "quantity": 1, "price": 4.5},
                      {"name": "Cappuccino", "quantity": 2, "price": 3.2},
                      {"name": "Almond croissant", "quantity": 3, "price": 2.75}],
            "total": 19.15, "paid": True}


def load_tokenizer(folder: Path | None):
    """(tokenizers.Tokenizer, where it came from)."""
    from tokenizers import Tokenizer

    if folder is not None:
        return Tokenizer.from_file(str(folder / "tokenizer.json")), str(folder)
    from minicpmo.export.synth_tokenizer import grown_bpe, make_tokenizer, upstream_tokenizer_metadata

    base = VOCAB - len(upstream_tokenizer_metadata()["added_tokens"])
    return make_tokenizer(*grown_bpe(base))[0], f"synthetic, grown to {VOCAB}"


def token_bytes(tok) -> list[bytes]:
    """Each id's bytes (byte-level pieces decoded; added tokens as their text; b"" past the end)."""
    from minicpmo.runtime.tokenizer import byte_level_bytes

    table = [b""] * VOCAB
    added = tok.get_added_tokens_decoder()
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        table[i] = piece.encode() if i in added else (byte_level_bytes(piece) or b"")
    return table


def _walk(mask_step, reply: list[int], logits: np.ndarray) -> list[float]:
    """Seconds per token of mask + apply + advance along the reply."""
    times = []
    for token in reply:
        row = logits.copy()
        t0 = time.perf_counter()
        mask_step(row, token)
        times.append(time.perf_counter() - t0)
    return times


def _apply_bitmask(row: np.ndarray, bitmask: np.ndarray) -> None:
    allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:len(row)]
    row[allowed == 0] = -np.inf


def bench_llguidance(tok, reply, stop_id, logits, repeats):
    import llguidance as llg
    import llguidance.numpy as lln

    t0 = time.perf_counter()
    lltok = llg.LLTokenizer(tok.to_str(), n_vocab=VOCAB, eos_token=stop_id)
    index_s = time.perf_counter() - t0
    grammar = llg.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    compile_s, per_token = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matcher = llg.LLMatcher(lltok, grammar)
        compile_s.append(time.perf_counter() - t0)
        bitmask = lln.allocate_token_bitmask(1, VOCAB)

        def step(row, token, matcher=matcher, bitmask=bitmask):
            lln.fill_next_token_bitmask(matcher, bitmask)
            _apply_bitmask(row, bitmask[0])
            assert np.isfinite(row[token]) and matcher.consume_token(token), "the document must be valid"
        per_token += _walk(step, reply, logits)
    return {"version": llg.__version__, "index_s": index_s, "compile_s": compile_s, "per_token_s": per_token}


def bench_outlines_core(tok, reply, stop_id, logits, repeats, table):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    pieces: dict[bytes, list[int]] = {}
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    for i, b in enumerate(table):
        if b and i not in special and i != stop_id:
            pieces.setdefault(b, []).append(i)
    vocabulary = oc.Vocabulary(stop_id, pieces)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern="")
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = oc.Index(regex, vocabulary)  # the automaton over the whole vocabulary: per schema
    compile_s = [time.perf_counter() - t0]
    per_token = []
    for _ in range(repeats):
        guide = oc.Guide(index)
        bitmask = np.full((VOCAB + 31) // 32, -1, dtype=np.int32)

        def step(row, token, guide=guide, bitmask=bitmask):
            guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
            _apply_bitmask(row, bitmask)
            assert np.isfinite(row[token]), "the document must be valid"
            if token != stop_id:  # the final state has no transition on the stop token
                guide.advance(token)
        per_token += _walk(step, reply, logits)
    return {"version": _version("outlines-core"), "index_s": vocab_s, "compile_s": compile_s,
            "per_token_s": per_token}


def bench_xgrammar(tok, reply, stop_id, logits, repeats):
    import xgrammar as xgr  # imports torch and transformers: measured for the record only

    t0 = time.perf_counter()
    vocab = [None] * VOCAB
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        vocab[i] = piece
    vocab = [p if p is not None else "" for p in vocab]
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[stop_id])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    index_s = time.perf_counter() - t0
    compile_s, per_token = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                separators=(",", ":"))
        compile_s.append(time.perf_counter() - t0)
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, VOCAB)

        def step(row, token, matcher=matcher, bitmask=bitmask):
            matcher.fill_next_token_bitmask(bitmask)
            _apply_bitmask(row, bitmask[0].numpy())
            assert np.isfinite(row[token]) and matcher.accept_token(token), "the document must be valid"
        per_token += _walk(step, reply, logits)
    return {"version": _version("xgrammar"), "index_s": index_s, "compile_s": compile_s, "per_token_s": per_token}


def bench_runtime(tok, reply, stop_id, logits, repeats):
    """This project's path: a greedy Sampler with a GrammarConstraint (mask, unpack, -inf, argmax,
    advance) minus the same Sampler without one, per token. The reply's token is made the best one."""
    from minicpmo.runtime.constrain import GrammarVocabulary
    from minicpmo.runtime.sampler import make_sampler
    from minicpmo.runtime.types import GenerationParams

    t0 = time.perf_counter()
    vocabulary = GrammarVocabulary(tok.to_str(), VOCAB, [stop_id])
    index_s = time.perf_counter() - t0
    params = GenerationParams(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}})
    history = np.zeros(0, dtype=np.int64)

    def walk(sampler) -> list[float]:
        times = []
        for token in reply:
            row = logits.copy()
            row[token] = 100.0
            t0 = time.perf_counter()
            assert sampler(row, history, 0) == token, "the document must be valid"
            times.append(time.perf_counter() - t0)
        return times

    compile_s, per_token = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        constraint = vocabulary.constraint(params.response_format)
        compile_s.append(time.perf_counter() - t0)
        constrained = walk(make_sampler(params, constraint=constraint))
        plain = walk(make_sampler(params))
        per_token += [c - p for c, p in zip(constrained, plain, strict=True)]
    return {"version": "GrammarConstraint + Sampler, minus Sampler alone", "index_s": index_s,
            "compile_s": compile_s, "per_token_s": per_token}


def bench_bundle(bundle: Path, threads: int, rounds: int = 3, max_tokens: int = 64) -> dict:
    """Median ms per decode step of the bundle's greedy reply, without and with the schema."""
    from minicpmo.runtime.pipeline import Pipeline
    from minicpmo.runtime.types import GenerationParams

    pipe = Pipeline.load(bundle, provider="cpu", threads=threads)
    messages = [{"role": "user", "content": "Extract the receipt as JSON: Corner Bakery & Cafe, 2026-03-14, "
                                            "sourdough loaf 4.50, 2 cappuccino 3.20 each, total 19.15 EUR, paid."}]
    formats = {"plain": None, "schema": {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA}}}
    steps: dict[str, list[float]] = {name: [] for name in formats}
    list(pipe.generate(messages, GenerationParams(max_tokens=4, response_format=formats["schema"])))  # warm-up
    for _ in range(rounds):
        for name, fmt in formats.items():
            usage = list(pipe.generate(messages, GenerationParams(max_tokens=max_tokens, response_format=fmt,
                                                                  cache_prompt=False)))[-1].usage
            if usage.completion_tokens > 1:
                steps[name].append(1e3 * usage.decode_seconds / (usage.completion_tokens - 1))
    return {name: statistics.median(v) for name, v in steps.items() if v} | {"bundle": str(bundle)}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def logprobs_line(logits: np.ndarray, repeats: int = 50) -> str:
    """What `logprobs` costs per token: the sampler's top_logprobs on a float32 row [V]."""
    from minicpmo.runtime.sampler import top_logprobs

    parts = []
    for n in (0, 5, 20):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            top_logprobs(logits, 0, n)
            times.append(time.perf_counter() - t0)
        parts.append(f"top_logprobs={n}: {1e6 * statistics.median(times):.0f} µs")
    return "logprobs per token (median): " + ", ".join(parts)


def summary(name: str, r: dict) -> str:
    t = np.array(r["per_token_s"]) * 1e6
    return (f"| {name} {r['version']} | {r['index_s']:.2f} | {1e3 * statistics.median(r['compile_s']):.1f} | "
            f"{np.median(t):.0f} | {np.percentile(t, 95):.0f} | {t.max():.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grammar", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", type=Path, default=REAL_TOKENIZER if REAL_TOKENIZER.is_dir() else None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the raw timings here")
    p.add_argument("--bundle", type=Path, help="also time decode steps of this bundle without and with the schema")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    setup_logging()
    tok, source = load_tokenizer(args.tokenizer)
    stop_id = tok.token_to_id("<|im_end|>")
    reply = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).ids + [stop_id]
    logits = np.random.default_rng(0).standard_normal(VOCAB).astype(np.float32)
    table = token_bytes(tok)
    log.info("host ISA: %s; tokenizer: %s; reply of %d tokens", isa(), source, len(reply))
    results = {}
    runs = {"llguidance": lambda: bench_llguidance(tok, reply, stop_id, logits, args.repeats),
            "outlines-core": lambda: bench_outlines_core(tok, reply, stop_id, logits, args.repeats, table),
            "xgrammar": lambda: bench_xgrammar(tok, reply, stop_id, logits, args.repeats),
            "runtime": lambda: bench_runtime(tok, reply, stop_id, logits, args.repeats)}
    for name, run in runs.items():
        try:
            results[name] = run()
        except ImportError as e:
            log.warning("%s: not installed (%s)", name, e)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, ISA {isa()}, tokenizer: {source}, V = {VOCAB}, "
          f"{len(reply)}-token reply x {args.repeats}")
    print("| library | tokenizer index s | compile ms | mask+apply+advance µs p50 | p95 | max |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(summary(name, r))
    print(logprobs_line(logits))
    if args.bundle:
        r = results["bundle"] = bench_bundle(args.bundle, args.threads)
        print(f"decode step, {args.bundle.name}, {args.threads} threads: {r['plain']:.1f} ms plain, "
              f"{r['schema']:.1f} ms with the schema (medians of 3 alternating rounds)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
