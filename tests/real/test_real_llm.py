"""Trained weights end to end (`make test-real`, not in CI: it downloads 0.5 GB and takes ~15 minutes).

The registry's Qwen2.5-Coder-0.5B-Instruct grafted into a MiniCPM-o checkpoint (benchmarks/real_llm.py):
- the fp32 export's greedy reply equals transformers' Qwen2ForCausalLM on the same dequantized weights
  for 32 tokens (the same prompt ids: our chat template's);
- the default export's mean KL to the fp32 export on the first chunks of benchmarks/quality.py's
  corpus stays under KL_BOUND.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MINICPMO_REAL_WEIGHTS") != "1",
                                reason="trained-weight tests run with MINICPMO_REAL_WEIGHTS=1 (make test-real)")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/

CACHE = Path(os.environ.get("MINICPMO_REAL_CACHE", Path.home() / ".cache" / "minicpmo-onnx" / "real-llm"))
CHUNKS = 4
# The default export (block 128, int4+int8 head, accuracy level 4) measured 0.106 on these 4 chunks of the
# 0.5B (2026-12-03, `make test-real`, printed with -s; RESULTS.md section 11); the bound leaves ~40% for
# CPU-to-CPU rounding differences of int8 activations, and fails for a broken quantizer, a wrong graft
# (KL in whole nats) or a wrong tokenizer.
KL_BOUND = 0.15


@pytest.fixture(scope="module")
def graft():
    from benchmarks.real_llm import graft as build

    return build("0.5b", CACHE)


@pytest.fixture(scope="module")
def bundles(graft, tmp_path_factory):
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = {}
    for name, opts in (("fp32", ExportOptions(precision="fp32", audio=False, tts=False)),
                       ("default", ExportOptions(audio=False, tts=False))):
        out[name] = export_bundle(graft, tmp_path_factory.mktemp("real") / name, opts, progress=lambda *a: None)
    return out


def test_fp32_greedy_reply_equals_transformers(graft, bundles, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from benchmarks.convert import write_hf_qwen2
    from minicpmo.export.checkpoint import open_checkpoint
    from minicpmo.runtime.pipeline import Pipeline
    from minicpmo.runtime.types import GenerationParams

    pipe = Pipeline.load(bundles["fp32"], provider="cpu", context_length=512)
    pipe.stop_ids = set()  # 32 tokens whatever the reply
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    ours = [t for c in pipe.generate(messages, GenerationParams(max_tokens=32)) for t in c.token_ids]
    prompt = list(pipe.last_prompt_ids)
    hf_dir = write_hf_qwen2(open_checkpoint(graft), tmp_path / "hf")
    model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    assert ours == theirs
    assert "def" in pipe.tokenizer.decode(ours)  # a trained model answers in code


def test_default_export_kl_is_bounded(bundles, tmp_path):
    from benchmarks.quality import OursEngine, Reference, corpus, evaluate
    from minicpmo.runtime.tokenizer import Tokenizer

    chunks = corpus(Tokenizer(bundles["fp32"] / "tokenizer.json"), CHUNKS)
    ref = Reference(bundles["fp32"], chunks, threads=2, cache=tmp_path)
    result = evaluate(OursEngine(bundles["default"], 2), ref, chunks, "default")
    print(f"\ndefault export on {CHUNKS} chunks: mean KL {result['kl_mean']:.4f}, top-1 {result['same_top1']:.3f}, "
          f"perplexity {result['perplexity']:.3f}")  # shown with -s: the figure KL_BOUND is set from
    assert 0 < result["kl_mean"] < KL_BOUND, result
    assert result["same_top1"] > 0.8
    assert np.isfinite(result["perplexity"])
