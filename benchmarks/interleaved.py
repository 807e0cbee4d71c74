"""Decode speed of several engines in ONE process, interleaved every few tokens: the ratio to trust
on a host whose memory bandwidth drifts by ±25% over minutes.

    python -m benchmarks.interleaved --ours BUNDLE [--ours BUNDLE] [--ortgenai DIR] [--gguf FILE] \
        [--rounds 3] [--chunk 16] [--prompt-tokens 512] [--decode-tokens 128] [--threads 2] [--json]

The peers script runs each engine in its own process, one after another: a ratio between two of
them then also measures how the host changed between their runs (RESULTS.md, "Noise"). Here every
engine is loaded once, each round prefills the same prompt in each (timed), and then the engines
take turns decoding `chunk` greedy tokens each, in an order that rotates, until each has decoded
`decode_tokens`. Every turn of the cycle sees the same host state within a few seconds, so the
ratio of two engines' times in one cycle cancels the drift; its median over all cycles and rounds
is the figure. The prompt, token count and context are those of the peers script (common.Protocol).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import Protocol, peak_rss_bytes, prompt_ids, setup_logging

log = logging.getLogger("benchmarks.interleaved")


class OursEngine:
    def __init__(self, bundle: Path, proto: Protocol):
        from .peer_ours import DecoderOnly

        self.name = f"ours {bundle.name}"
        self.d = DecoderOnly(bundle, proto.threads, proto.context)
        self.ids = prompt_ids(proto.prompt_tokens, self.d.info["vocab_size"])

    def prefill(self) -> None:
        self.d.kv.reset()
        self.logits = self.d.prefill(self.ids)

    def step(self) -> None:
        self.logits = self.d.step(self.logits)


class OrtGenaiEngine:
    def __init__(self, model_dir: Path, proto: Protocol):
        from .peer_ortgenai import open_model

        self.name = f"onnxruntime-genai {model_dir.name}"
        self.model, dec = open_model(model_dir, proto.threads)
        self.ids = prompt_ids(proto.prompt_tokens, dec["vocab_size"])
        self.total = proto.prompt_tokens + proto.decode_tokens

    def prefill(self) -> None:
        from .peer_ortgenai import greedy_generator

        self.gen = greedy_generator(self.model, self.total)
        self.gen.append_tokens(self.ids)
        self.gen.generate_next_token()  # picks from the prompt's logits: part of the prefill

    def step(self) -> None:
        self.gen.generate_next_token()


class LlamaCppEngine:
    def __init__(self, gguf: Path, proto: Protocol):
        from .peer_llamacpp import _Context

        self.name = f"llama.cpp {gguf.stem}"
        self.ctx = _Context(gguf, proto)
        self.ids = prompt_ids(proto.prompt_tokens, self.ctx.n_vocab)

    def prefill(self) -> None:
        self.ctx.clear()
        self.logits = self.ctx.decode(self.ids)

    def step(self) -> None:
        self.logits = self.ctx.decode(np.array([int(np.argmax(self.logits))]))


def interleave(engines: list, proto: Protocol, rounds: int, chunk: int, clock=time.perf_counter) -> dict:
    """{"prefill_s": {name: [per round]}, "chunks": [{name: seconds per token} per cycle]}.

    An engine has `name`, `prefill()` (a fresh prompt into an empty cache) and `step()` (one greedy token)."""
    steps = proto.decode_tokens - 1  # the first token comes from the prefill's logits
    prefill_s = {e.name: [] for e in engines}
    cycles = []
    for r in range(rounds):
        order = engines[r % len(engines):] + engines[:r % len(engines)]
        for e in order:
            t0 = clock()
            e.prefill()
            prefill_s[e.name].append(clock() - t0)
        done, first = 0, len(cycles)
        while done < steps:
            n = min(chunk, steps - done)
            cycle = {}
            for e in order:
                t0 = clock()
                for _ in range(n):
                    e.step()
                cycle[e.name] = (clock() - t0) / n
            cycles.append(cycle)
            order = order[1:] + order[:1]  # who goes first (after another engine's turn) rotates
            done += n
        log.info("round %d/%d: %s", r + 1, rounds, ", ".join(
            f"{name} {1 / statistics.median(c[name] for c in cycles[first:]):.2f} tok/s"
            for name in prefill_s))
    return {"prefill_s": prefill_s, "chunks": cycles}


def summarize(res: dict, proto: Protocol, ratio_to: list[str]) -> dict:
    """Per engine: prefill and decode tok/s (medians) and, against each name in ratio_to, the
    median and range of the per-cycle decode ratio (that engine's time ÷ this one's: > 1, this one is
    faster)."""
    out = {}
    for name, pre in res["prefill_s"].items():
        per_tok = [c[name] for c in res["chunks"]]
        row = {"prefill_tok_s": round(proto.prompt_tokens / statistics.median(pre), 2),
               "decode_tok_s": round(1 / statistics.median(per_tok), 2), "ratios": {}}
        for other in ratio_to:
            if other == name:
                continue
            r = [c[other] / c[name] for c in res["chunks"]]
            q = np.percentile(r, [10, 90])
            row["ratios"][other] = {"decode_median": round(statistics.median(r), 3),
                                    "decode_p10": round(float(q[0]), 3), "decode_p90": round(float(q[1]), 3),
                                    "prefill_median": round(statistics.median(
                                        a / b for a, b in zip(res["prefill_s"][other], pre, strict=True)), 3)}
        out[name] = row
    return out


def run(ours: list[Path], ortgenai: list[Path], gguf: list[Path], proto: Protocol, rounds: int,
        chunk: int) -> dict:
    """Load every engine (the largest first: its load transient peaks before the others hold their
    memory), interleave them, and summarize: ours against every peer and against each other."""
    engines = []
    for cls, paths in ((OrtGenaiEngine, ortgenai), (OursEngine, ours), (LlamaCppEngine, gguf)):
        for path in paths:
            t0 = time.perf_counter()
            engines.append(cls(Path(path), proto))
            log.info("loaded %s in %.1f s (process peak RSS %.2f GB)", engines[-1].name,
                     time.perf_counter() - t0, peak_rss_bytes() / 1e9)
    if len(engines) < 2:
        raise ValueError("interleaving needs at least two engines")
    names = [e.name for e in engines]
    if len(set(names)) < len(names):
        raise ValueError(f"two engines share a name (the folder or file name): {names}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    res = interleave(engines, proto, rounds, chunk)
    peers = [e.name for e in engines if not isinstance(e, OursEngine)]
    ours_names = [e.name for e in engines if isinstance(e, OursEngine)]
    return {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds,
            "chunk": chunk, "peers": peers, "ours": ours_names, "process_peak_rss_bytes": peak_rss_bytes(),
            "summary": summarize(res, proto, peers + ours_names), **res}


def markdown(result: dict) -> str:
    """Rows: every engine; columns: its decode ratio to each peer (median and p10-p90 over cycles)."""
    others = result["peers"] + result["ours"][1:]
    lines = [f"Interleaved in one process ({result['started']} to {result['finished']}): {result['rounds']} rounds, "
             f"turns of {result['chunk']} tokens; a ratio is the median over cycles of (peer's time ÷ this engine's "
             "time) in the same cycle (> 1: this engine is faster), p10-p90 in brackets.", "",
             "| engine | prefill tok/s | decode tok/s | " + " | ".join(f"decode ÷ {n}" for n in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for name, row in result["summary"].items():
        cells = [f"{row['ratios'][n]['decode_median']:.2f} ({row['ratios'][n]['decode_p10']:.2f}-"
                 f"{row['ratios'][n]['decode_p90']:.2f})" if n in row["ratios"] else "" for n in others]
        lines.append(f"| {name} | {row['prefill_tok_s']:.1f} | {row['decode_tok_s']:.2f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__.split("\n")[0])
    p.add_argument("--ours", type=Path, action="append", default=[], help="a bundle folder (repeatable)")
    p.add_argument("--ortgenai", type=Path, action="append", default=[], help="an onnxruntime-genai model folder")
    p.add_argument("--gguf", type=Path, action="append", default=[], help="a GGUF file for llama.cpp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=16, help="tokens per turn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if len(a.ours) + len(a.ortgenai) + len(a.gguf) < 2:
        p.error("give at least two engines")
    setup_logging()
    proto = Protocol(a.prompt_tokens, a.decode_tokens, 1, a.threads)
    result = run(a.ours, a.ortgenai, a.gguf, proto, a.rounds, a.chunk)
    if a.json:
        result["protocol"] = {"ours": [str(x) for x in a.ours], "ortgenai": [str(x) for x in a.ortgenai],
                              "gguf": [str(x) for x in a.gguf], "threads": a.threads,
                              "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens}
    print(json.dumps(result, indent=1) if a.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
