"""Batched decode steps in one process: what B sequences per step cost, and the one-sequence step of
bundles compared in alternating rounds (a batch-dimension graph against a batch-1 copy of it).

    python -m benchmarks.batch_decode BUNDLE [--batches 1,2,4,8] [--context-tokens 256] [--steps 16]
    python -m benchmarks.batch_decode BUNDLE --single OTHER_BUNDLE [--rounds 6]

Each batch size: B slots hold `context-tokens` cached positions each (prefilled once), then `steps`
decode steps over all B are timed; aggregate tok/s = B * steps / time, and ms per step. Rounds go
through the sizes (or bundles) in alternating order, and the median is reported, so a neighbour's
load on a shared machine spreads over all of them; the load seen is reported with the figures.
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

from .common import ForeignLoad, prompt_ids, setup_logging

log = logging.getLogger("benchmarks")


def _pipeline(bundle: Path, threads: int, context: int, parallel: int):
    from minicpmo.runtime.pipeline import Pipeline

    return Pipeline.load(bundle, provider="cpu", threads=threads, context_length=context, parallel=parallel)


def batch_steps(bundle: Path, batches: list[int], context_tokens: int, steps: int, rounds: int,
                threads: int) -> dict:
    """{B: {"ms_per_step", "tok_s"}} for each batch size, medians over rounds."""
    p = _pipeline(bundle, threads, context_tokens + steps * rounds + 8, max(batches))
    bd = p.batch
    ids = prompt_ids(context_tokens, p.embed.vocab_size)
    for slot in range(max(batches)):
        bd.prefill(slot, p.embed(ids), [int(t) for t in ids])
    times: dict[int, list[float]] = {b: [] for b in batches}
    with ForeignLoad() as load:
        for r in range(rounds):
            for b in batches if r % 2 == 0 else batches[::-1]:
                rows = {s: (p.embed(np.array([s + 1]))[0], s + 1) for s in range(b)}
                t0 = time.perf_counter()
                for _ in range(steps):
                    bd.step(rows)
                times[b].append((time.perf_counter() - t0) / steps)
                for s in range(b):  # back to the prompt: every round reads the same lengths
                    bd.caches.slots[s].truncate(context_tokens)
    out = {b: {"ms_per_step": round(1000 * statistics.median(t), 2),
               "tok_s": round(b / statistics.median(t), 2)} for b, t in times.items()}
    return {"batches": out, "other_processes_cores": round(load.cores, 2)}


def single_ab(bundles: list[Path], context_tokens: int, steps: int, rounds: int, threads: int) -> dict:
    """One sequence's decode step per bundle (its own single-sequence Pipeline), alternating rounds."""
    pipes = {b.name: _pipeline(b, threads, context_tokens + steps + 8, 1) for b in bundles}
    times: dict[str, list[float]] = {n: [] for n in pipes}
    names = list(pipes)
    with ForeignLoad() as load:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                p = pipes[name]
                ids = prompt_ids(context_tokens, p.embed.vocab_size)
                p.kv.reset()
                logits = p.decoder.prefill(p.embed(ids), [int(t) for t in ids])
                t0 = time.perf_counter()
                for _ in range(steps):
                    token = int(np.argmax(logits))
                    logits = p.decoder.forward(p.embed(np.array([token])), [token])
                times[name].append((time.perf_counter() - t0) / steps)
    return {"single": {n: {"ms_per_step": round(1000 * statistics.median(t), 2),
                           "ms_per_step_rounds": [round(1000 * x, 2) for x in t]} for n, t in times.items()},
            "other_processes_cores": round(load.cores, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_decode", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--single", type=Path, metavar="OTHER_BUNDLE",
                   help="compare one-sequence decode steps of BUNDLE and this bundle instead")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--context-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    setup_logging()
    from minicpmo.runtime.bench import header

    if a.single:
        result = single_ab([a.bundle, a.single], a.context_tokens, a.steps, a.rounds, a.threads)
    else:
        batches = [int(b) for b in a.batches.split(",")]
        result = batch_steps(a.bundle, batches, a.context_tokens, a.steps, a.rounds, a.threads)
    result["host"] = header(a.threads)
    result["args"] = {k: str(v) for k, v in vars(a).items()}
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
