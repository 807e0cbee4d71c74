"""Prompt lookup decoding: decode speed against plain decoding, in one process, alternating rounds.

    python -m benchmarks.lookup BUNDLE [--lookup 4] [--rounds 3] [--threads 2] [--decode-tokens 128]

A synthetic checkpoint's random weights do not copy from their context the way a real model quoting
a document does, so two kinds of runs are measured:
- `lookup`: the real draft finder and sampler on the synthetic model's own reply (what this bundle
  gets; random weights drift into loops, which the finder catches);
- `scripted a=X`: the reply is fixed in advance (the plain reply), the sampler still computes its
  choice on every row but returns the script's token, and drafts are the script's next tokens, each
  right with probability X (seeded). Every step runs as it would for a real model whose drafts are
  kept at that rate, and speed depends on the weights' shapes, not their values: this is the speed
  curve to read a real workload's acceptance rate against.
With int8 activations a verify step rounds like a prefill, so `lookup`'s reply may part from plain
decoding's where two tokens nearly tie (frequent on random weights, whose logits are flat): the table
says where. The verify step's cost by width is printed too.
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

from .common import setup_logging

log = logging.getLogger("benchmarks")

# ~420 tokens: a document the question refers to, as in an extraction or quoting request
DOCUMENT = " ".join(
    f"Item {i}: the shipment of {i * 7 % 13 + 2} crates left the northern depot on day {i % 28 + 1} and "
    f"reached the harbour after {i % 5 + 2} days." for i in range(16))
# a quote-and-modify request: trained weights copy most of the function back, which is where prompt
# lookup's drafts come from (random weights do not, hence the scripted runs)
FUNCTION = '''def wrap_paragraphs(text, width=72, indent=""):
    """Wrap each paragraph of `text` to `width` columns, keeping blank lines between paragraphs."""
    paragraphs = []
    for block in text.split("\\n\\n"):
        words = block.split()
        if not words:
            continue
        lines, current = [], indent
        for word in words:
            if len(current) + len(word) + 1 > width and current.strip():
                lines.append(current.rstrip())
                current = indent
            current += word + " "
        if current.strip():
            lines.append(current.rstrip())
        paragraphs.append("\\n".join(lines))
    return "\\n\\n".join(paragraphs)
'''
TASKS = {
    "document": f"{DOCUMENT}\n\nList every item above, word for word.",
    "edit": f"```python\n{FUNCTION}```\n\nRename the parameter `width` to `max_width` everywhere in this "
            "function and add type hints. Reply with the whole function only.",
}


def _run(pipe, params, messages) -> tuple[list[int], object]:
    chunks = list(pipe.generate(messages, params))
    return [t for c in chunks for t in c.token_ids], chunks[-1].usage


def verify_step_cost(pipe, widths=(1, 2, 3, 5, 9), repeats=7) -> dict[int, float]:
    """Median ms of one decoder step over `width` new positions after a 256-token context."""
    d, ids = pipe.decoder, np.arange(1000, 1300)
    embeds = pipe.embed(ids)
    out = {}
    for w in widths:
        times = []
        for _ in range(repeats):
            pipe.kv.reset()
            d.prefill(embeds[:256], ids[:256].tolist())
            t0 = time.perf_counter()
            d.forward_all(embeds[256:256 + w], ids[256:256 + w].tolist())
            times.append(time.perf_counter() - t0)
        out[w] = 1000 * statistics.median(times)
    pipe.kv.reset()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lookup", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--lookup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--task", choices=sorted(TASKS), default="document",
                   help="document: list a document's items word for word; edit: rename a parameter of a "
                        "given function and reply with the whole function (for trained weights)")
    p.add_argument("--acceptance", default="1.0,0.8,0.6,0.4,0.0", help="draft acceptance rates of the scripted runs")
    a = p.parse_args(argv)
    setup_logging()
    from minicpmo.runtime import generate as gen
    from minicpmo.runtime.pipeline import Pipeline
    from minicpmo.runtime.sampler import Sampler
    from minicpmo.runtime.types import GenerationParams

    pipe = Pipeline.load(a.bundle, provider="cpu", threads=a.threads, context_length=1024)
    messages = [{"role": "user", "content": TASKS[a.task]}]
    plain = GenerationParams(max_tokens=a.decode_tokens, temperature=0.0)
    _run(pipe, plain, messages)  # fills the prompt's KV: every later run re-uses it (a warm prompt's last
    reply, _ = _run(pipe, plain, messages)  # position is not bit-identical to a cold one, so compare warm runs)
    n_prompt = len(pipe.last_prompt_ids)
    real_draft = gen.lookup_draft

    class Script:
        """Drafts: the script's next tokens, each right with probability `rate`; the sampler: the
        real one's work on each row, then the script's token."""

        def __init__(self, rate: float):
            self.rate, self.rng = rate, np.random.default_rng(0)

        def draft(self, history, max_tokens, ngrams=None):
            done = len(history) - n_prompt
            d = np.array(reply[done:done + max_tokens], dtype=np.int64)
            wrong = self.rng.random(len(d)) >= self.rate
            return np.where(wrong, (d + 1) % pipe.decoder.vocab_size, d)

        def sampler(self, params, constraint=None):
            real = make_sampler(params, constraint=constraint)
            real.__class__ = ScriptedSampler  # the real one's state and work, the script's choice
            return real

    class ScriptedSampler(Sampler):
        def __call__(self, logits, history, n_prompt):
            super().__call__(logits, history, n_prompt)
            return reply[len(history) - n_prompt]

    import minicpmo.runtime.pipeline as pipeline_mod
    make_sampler = pipeline_mod.make_sampler
    rates = [float(x) for x in a.acceptance.split(",")]
    modes = {"plain": (0, None), "lookup": (a.lookup, None)}
    modes |= {f"scripted a={r:.1f}": (a.lookup, Script(r)) for r in rates}
    speed: dict[str, list[float]] = {m: [] for m in modes}
    drafts: dict[str, tuple[int, int]] = {}
    parted: dict[str, int | None] = {}  # first position where the reply differs from plain decoding's
    try:
        for r in range(a.rounds):
            for name in list(modes) if r % 2 == 0 else list(modes)[::-1]:
                lookup, script = modes[name]
                gen.lookup_draft = script.draft if script else real_draft
                pipeline_mod.make_sampler = script.sampler if script else make_sampler
                tokens, usage = _run(pipe, GenerationParams(max_tokens=a.decode_tokens, temperature=0.0,
                                                            lookup=lookup), messages)
                parted[name] = next((i for i, (x, y) in enumerate(zip(tokens, reply, strict=False)) if x != y),
                                    None if len(tokens) == len(reply) else min(len(tokens), len(reply)))
                speed[name].append(usage.decode_tokens_per_s)
                drafts[name] = (usage.draft_tokens, usage.accepted_draft_tokens)
                log.info("round %d %s: %.2f tok/s, %d drafted, %d kept", r + 1, name, speed[name][-1],
                         *drafts[name])
    finally:
        gen.lookup_draft, pipeline_mod.make_sampler = real_draft, make_sampler
    cost = verify_step_cost(pipe)
    base = statistics.median(speed["plain"])
    print(f"| mode (lookup {a.lookup}) | decode tok/s | × plain | draft tokens kept / fed | reply = plain's | rounds |")
    print("|---|---|---|---|---|---|")
    for name, xs in speed.items():
        kept, fed = drafts[name][1], drafts[name][0]
        same = "yes" if parted[name] is None else f"up to token {parted[name]}"
        print(f"| {name} | {statistics.median(xs):.2f} | {statistics.median(xs) / base:.2f} | {kept} / {fed} "
              f"| {same} | {', '.join(f'{x:.1f}' for x in xs)} |")
    print("\n| positions in one step | ms | × one position |\n|---|---|---|")
    for w, ms in cost.items():
        print(f"| {w} | {ms:.1f} | {ms / cost[1]:.2f} |")
    print(f"\nreply ({a.task}, plain decoding):\n{pipe.tokenizer.decode(reply)}", file=sys.stderr)
    print(json.dumps({"bundle": str(a.bundle), "task": a.task, "lookup": a.lookup, "decode_tokens": a.decode_tokens,
                      "speed": speed, "drafts": drafts, "parted": parted, "step_ms": cost}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
