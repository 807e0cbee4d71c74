"""How far an int8-KV bundle's outputs move from the same bundle with an fp32 cache.

    python -m benchmarks.kv_quality FP32_KV_BUNDLE INT8_KV_BUNDLE [--json]

Both bundles must hold the same weights (export once, then `export.bundle._use_int8_kv_cache` on a
copy, or export twice with and without `--kv-cache int8`). For a short question, an image, a
~1.4k-token text and a two-turn chat it prints the cosine of the first token's logits, whether their
argmax agrees, how many of 32 greedy tokens agree before the first difference, and the fraction of
int8 cache entries at the +-127 limit (values past the calibrated range). On synthetic weights the
greedy run diverges at the first flipped token and never comes back (their logits move by 3% for a
1e-6 change of the input), so the cosine is the figure to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PARAGRAPH = ("Photosynthesis converts light energy into chemical energy. In plants it happens in chloroplasts, "
             "where chlorophyll absorbs mostly blue and red light. The light reactions split water and release "
             "oxygen; the Calvin cycle then fixes carbon dioxide into sugars. ")


def cases() -> dict[str, list[dict]]:
    from PIL import Image

    image = Image.open(Path(__file__).resolve().parents[1] / "cli" / "assets" / "demo.png").convert("RGB")
    return {
        "short question": [{"role": "user", "content": "What is the capital of France?"}],
        "image": [{"role": "user", "content": [{"type": "image", "image": image},
                                               {"type": "text", "text": "What is in this picture?"}]}],
        "~1.4k-token text": [{"role": "user", "content": PARAGRAPH * 28 + " Summarise the text above."}],
        "two turns": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "Tell me a joke about cats."}],
    }


def _run(pipe, messages, max_tokens: int = 32) -> tuple[np.ndarray, list[int]]:
    """The first token's logits and a greedy reply, each from a cold prefill."""
    from minicpmo.runtime.types import GenerationParams

    logits, _ = pipe.prompt_logits(messages, cache_prompt=False)
    params = GenerationParams(max_tokens=max_tokens, cache_prompt=False)
    return logits, [t for c in pipe.generate(messages, params) for t in c.token_ids]


def compare(fp32_kv: Path, int8_kv: Path, threads: int = 2) -> list[dict]:
    from minicpmo.runtime.pipeline import Pipeline

    a = Pipeline.load(fp32_kv, provider="cpu", threads=threads)
    b = Pipeline.load(int8_kv, provider="cpu", threads=threads)
    if b.kv.dtype != np.int8:
        raise SystemExit(f"{int8_kv}: its KV cache is {b.kv.dtype}, not int8")
    rows = []
    for name, messages in cases().items():
        la, ta = _run(a, messages)
        lb, tb = _run(b, messages)
        same = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), min(len(ta), len(tb)))
        layers = [b.kv.layer(i) for i in range(b.kv.num_layers)]
        at_limit = sum(int((np.abs(x.astype(np.int16)) >= 127).sum()) for kv in layers for x in kv)
        rows.append({"case": name, "prompt_tokens": len(a.last_prompt_ids),
                     "logits_cosine": round(float(la @ lb / np.linalg.norm(la) / np.linalg.norm(lb)), 5),
                     "same_argmax": bool(la.argmax() == lb.argmax()), "greedy_tokens_before_first_difference": same,
                     "cache_entries_at_limit": at_limit / sum(x.size for kv in layers for x in kv)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kv_quality", description=__doc__.split("\n")[0])
    p.add_argument("fp32_kv", type=Path)
    p.add_argument("int8_kv", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = compare(a.fp32_kv, a.int8_kv, a.threads)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| case | prompt tokens | first-token logits cosine | same argmax | greedy tokens before the first "
          "difference (of 32) | int8 cache entries at +-127 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['prompt_tokens']} | {r['logits_cosine']:.5f} | {r['same_argmax']} | "
              f"{r['greedy_tokens_before_first_difference']} | {100 * r['cache_entries_at_limit']:.3f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
