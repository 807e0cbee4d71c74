"""The runtime must run where torch is not installed: import it and generate with torch blocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO_IMAGE = Path(__file__).resolve().parents[2] / "cli" / "assets" / "demo.png"

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
for name in ("transformers", "safetensors", "minicpmo.export"):
    sys.modules[name] = None
from PIL import Image
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.types import GenerationParams
import minicpmo.runtime.bench, minicpmo.runtime.audio, minicpmo.runtime.preprocess.audio
import minicpmo.runtime.preprocess.video, minicpmo.cli.infer, minicpmo.cli.chat
pipe = Pipeline.load(sys.argv[1], provider="cpu")
msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(sys.argv[2])},
                                      {"type": "text", "text": "What is it?"}]}]
chunks = list(pipe.generate(msgs, GenerationParams(max_tokens=4)))
assert chunks[-1].usage.completion_tokens >= 1
loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
assert all(sys.modules[m] is None for m in loaded), loaded
print("ok")
"""


def test_runtime_generates_without_torch(int4_bundle):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(int4_bundle), str(DEMO_IMAGE)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
