"""Several of our bundles' decoders in ONE process, measured in alternating rounds.

    python -m benchmarks.inprocess_ab BUNDLE BUNDLE [...] [--rounds 4] [--repeats 2] [--threads 2]

On a host whose speed drifts between processes and over minutes, this is the comparison to trust
for ratios between export settings (block size, head precision): same process, interleaved in time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

from .common import Protocol, prompt_ids, run_repeats, setup_logging
from .peer_ours import DecoderOnly


def compare(bundles: list[Path], proto: Protocol, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """{bundle name: [(prefill tok/s, decode tok/s) per round]}."""
    decoders = {b.name: DecoderOnly(b, proto.threads, proto.context) for b in bundles}
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in decoders}
    names = list(decoders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            d = decoders[name]
            ids = prompt_ids(proto.prompt_tokens, d.info["vocab_size"])

            def decode(logits, d=d):
                for _ in range(proto.decode_tokens - 1):
                    logits = d.step(logits)

            res = run_repeats(proto, lambda _, d=d, ids=ids: d.prefill(ids), decode, name, setup=d.kv.reset)
            out[name].append((res["prefill_tok_s"], res["decode_tok_s"]))
            logging.getLogger("benchmarks").info("round %d %s: %s", r + 1, name, out[name][-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inprocess_ab", description=__doc__.split("\n")[0])
    p.add_argument("bundles", type=Path, nargs="+")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    a = p.parse_args(argv)
    setup_logging()
    res = compare(a.bundles, Protocol(a.prompt_tokens, a.decode_tokens, a.repeats, a.threads), a.rounds)
    print("| bundle | prefill tok/s | decode tok/s | rounds (decode) |\n|---|---|---|---|")
    for name, rs in res.items():
        print(f"| {name} | {statistics.median(x[0] for x in rs):.1f} | {statistics.median(x[1] for x in rs):.2f} "
              f"| {', '.join(f'{x[1]:.1f}' for x in rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
