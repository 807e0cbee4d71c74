"""The speech model runs where torch is not installed: load it, step it, decode audio with torch blocked."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
for name in ("transformers", "safetensors", "minicpmo.export"):
    sys.modules[name] = None
import numpy as np
from minicpmo.runtime.manifest import load_manifest
from minicpmo.runtime.tts_model import TTSModel
model = TTSModel.load(load_manifest(sys.argv[1]))
ids, mask = model.text_input("hello world")
model.prefill(ids, model.speaker_embedding(np.ones(model.cfg.llm_dim, np.float32)), mask)
codes = [model.step(None).argmax(-1) % 625]
for _ in range(3):
    codes.append(model.step(codes[-1]).argmax(-1) % 625)
wave = model.mel_to_audio(model.codes_to_mel(np.stack(codes)))
assert wave.shape == (4 * 512,) and np.isfinite(wave).all()
loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
assert all(sys.modules[m] is None for m in loaded), loaded
print("ok")
"""


def test_speech_model_runs_without_torch(int4_bundle):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(int4_bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
