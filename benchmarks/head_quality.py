"""What a cheaper vocabulary head changes in the logits, against an unquantized head on the same layers.

    python -m benchmarks.head_quality FP32_HEAD_BUNDLE OTHER_BUNDLE [OTHER_BUNDLE ...] [--tokens 64] [--json]

All bundles must be exported from one checkpoint with the same block size and accuracy level, differing
only in `--lm-head-precision` (fp32 for the reference): their decoder layers are then byte-identical, and
so is every hidden state. The reference decodes greedily from a few prompts; each other bundle is fed
the same tokens (teacher forcing), so every step compares the logits of one hidden state. Per bundle it
prints, over all steps: how often the argmax agrees, the largest error of the reference's 16 best logits
(in units of the logits' standard deviation), and the mean KL divergence of the full softmax from the
reference's, beside the share of the reference's softmax its 64 best tokens hold (the int4+int8 head's
tail, the rest, has int4 logits: the KL of a flat distribution is mostly the tail's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a linked list.",
    "请用三句话介绍长城。",
    "Photosynthesis converts light energy into chemical energy. Explain the Calvin cycle.",
)


def _prompt_ids(bundle: Path, text: str) -> np.ndarray:
    from minicpmo.runtime.manifest import load_manifest
    from minicpmo.runtime.preprocess.prompt import render_chat
    from minicpmo.runtime.tokenizer import Tokenizer

    m = load_manifest(bundle)
    tok = m["tokenizer"]
    template = m.path(tok["chat_template"]).read_text(encoding="utf-8")
    prompt = render_chat([{"role": "user", "content": text}], template)
    return np.array(Tokenizer(m.path(tok["file"])).encode(prompt), dtype=np.int64)


def _softmax_log(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


def compare(reference: Path, others: list[Path], tokens: int, threads: int) -> list[dict]:
    from minicpmo.export.ops import RESCORE_CANDIDATES

    from .peer_ours import DecoderOnly

    ref = DecoderOnly(reference, threads, 4096)
    subjects = [DecoderOnly(b, threads, 4096) for b in others]
    stats = [{"bundle": str(b), "steps": 0, "same_argmax": 0, "top16_err_max": 0.0, "kl": []} for b in others]
    top64_mass = []  # how much of the reference's softmax its 64 best tokens hold: the rest is the tail
    for text in PROMPTS:
        ids = _prompt_ids(reference, text)
        for d in (ref, *subjects):
            d.kv.reset()
        outs = [ref.prefill(ids), *(d.prefill(ids) for d in subjects)]
        for _ in range(tokens):
            r = outs[0]
            top = np.argsort(-r)[:16]
            lr = _softmax_log(r)
            top64_mass.append(float(np.exp(np.sort(lr)[-RESCORE_CANDIDATES[4]:]).sum()))
            for s, o in zip(stats, outs[1:], strict=True):
                s["steps"] += 1
                s["same_argmax"] += int(o.argmax() == r.argmax())
                s["top16_err_max"] = max(s["top16_err_max"], float(np.abs(o[top] - r[top]).max() / r.std()))
                s["kl"].append(float((np.exp(lr) * (lr - _softmax_log(o))).sum()))
            token = int(r.argmax())  # the reference's greedy token, fed to every bundle
            outs = [d.decoder.forward(d.embed(np.array([token])), [token]) for d in (ref, *subjects)]
    for s in stats:
        s["argmax_agreement"] = s.pop("same_argmax") / s["steps"]
        s["kl_mean"] = float(np.mean(s.pop("kl")))
        s["reference_top64_mass_mean"] = float(np.mean(top64_mass))
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.head_quality", description=__doc__.split("\n")[0])
    p.add_argument("reference", type=Path, help="the fp32-head bundle")
    p.add_argument("others", type=Path, nargs="+")
    p.add_argument("--tokens", type=int, default=64, help="greedy steps per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = compare(a.reference, a.others, a.tokens, a.threads)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| bundle | steps | argmax agrees with the reference | max error of its top 16 logits (× logits' std) "
          "| mean KL(reference ‖ bundle) | reference's top-64 softmax mass |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bundle']} | {r['steps']} | {100 * r['argmax_agreement']:.2f}% | {r['top16_err_max']:.4f} | "
              f"{r['kl_mean']:.2e} | {r['reference_top64_mass_mean']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
