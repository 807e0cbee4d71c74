"""Runtime experiments on one bundle's decoder, same protocol as the peers (decode after a prompt).

    python -m benchmarks.experiments BUNDLE [--threads 2] [--repeats 3] [--json]

- baseline: runtime/generate.py's Decoder as the pipeline uses it (one IOBinding for its life, the
  step inputs updated in place; an earlier "persistent-binding" experiment here became that).
- no-spinning: baseline with session.intra_op.allow_spinning = 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Protocol, prompt_ids, run_repeats
from .peer_ours import DecoderOnly


def _run(d: DecoderOnly, proto: Protocol, step, name: str) -> dict:
    ids = prompt_ids(proto.prompt_tokens, d.info["vocab_size"])

    def decode(logits):
        for _ in range(proto.decode_tokens - 1):
            logits = step(logits)

    return run_repeats(proto, lambda _: d.prefill(ids), decode, name, setup=d.kv.reset)


SESSION_CONFIGS = {"no-spinning": {"session.intra_op.allow_spinning": "0"}}


def run_experiments(bundle: Path, proto: Protocol, which: list[str]) -> dict:
    out = {}
    for name in which:
        d = DecoderOnly(bundle, proto.threads, proto.context, session_config=SESSION_CONFIGS.get(name))
        out[name] = _run(d, proto, d.step, name)
    return out


def main(argv: list[str] | None = None) -> int:
    from .common import setup_logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--which", default="baseline,no-spinning")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    setup_logging()
    proto = Protocol(a.prompt_tokens, a.decode_tokens, a.repeats, a.threads)
    res = run_experiments(a.bundle, proto, a.which.split(","))
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print("| variant | prefill tok/s | decode tok/s | decode ms/token |\n|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {1000 / r['decode_tok_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
