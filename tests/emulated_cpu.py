"""Run a bundle's encoders and decoder on another CPU model, emulated by QEMU's user-mode x86-64.

MLAS (ONNX Runtime's CPU kernels) picks its int8 kernels by CPUID: AVX-512 VNNI, AVX2, or AVX-512
without VNNI give different code paths. `qemu-x86_64-static -cpu EPYC-Rome` runs this machine's own
Python and wheels on an emulated Zen 2 (AVX2, no AVX-512, no VNNI), so one host can check that a bundle
computes the same numbers on the CPUs users have. It is an emulator: its figures are numbers, never
speed.

    python tests/emulated_cpu.py BUNDLE OUT.npz    # what `outputs` gives, saved for the caller
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

QEMU = "qemu-x86_64-static"
AVX2_CPU = "EPYC-Rome"  # Zen 2: AVX2 and FMA, no AVX-512, no VNNI
GREEDY_TOKENS = 24


def qemu_unavailable() -> str | None:
    """Why the emulated run cannot happen here, or None."""
    if platform.machine() != "x86_64":
        return f"QEMU's x86-64 user mode emulates from x86-64 hosts (this is {platform.machine()})"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (Debian package qemu-user-static)"
    return None


def cpu_features() -> dict[str, bool]:
    """What NumPy's CPUID probe sees: under the emulator, the emulated CPU's features."""
    from numpy._core._multiarray_umath import __cpu_features__

    return {k: bool(__cpu_features__.get(k, False)) for k in ("AVX2", "AVX512F", "AVX512_VNNI", "AVXVNNI")}


def outputs(bundle: Path) -> dict[str, np.ndarray]:
    """Vision embeddings of one picture, audio embeddings of one tone, the first-token logits of a text
    prompt and of an image prompt, and a greedy reply to the text whose length is fixed by
    construction (no stop ids)."""
    from minicpmo.runtime.pipeline import Pipeline
    from minicpmo.runtime.types import GenerationParams
    from synthetic_media import make_image, tone

    pipe = Pipeline.load(bundle, provider="cpu", threads=1, context_length=1024)
    img = make_image(448, 448, seed=3)
    out = {"vision": pipe.vision.encode(pipe.vision.prepare(img))}
    if pipe.audio is not None:
        out["audio"] = pipe.audio.encode(tone(1.0))
    text = [{"role": "user", "content": "Write a short poem about the sea."}]
    out["text_logits"], _ = pipe.prompt_logits(text, cache_prompt=False)  # the decoder's inputs: identical
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    out["logits"], _ = pipe.prompt_logits(msgs, cache_prompt=False)
    pipe.stop_ids = set()
    params = GenerationParams(max_tokens=GREEDY_TOKENS, cache_prompt=False)
    out["greedy"] = np.array([t for c in pipe.generate(text, params) for t in c.token_ids], dtype=np.int64)
    return out


def run_emulated(bundle: Path, out: Path, cpu: str = AVX2_CPU, timeout: float = 900) -> dict[str, np.ndarray]:
    """`outputs(bundle)` computed under `qemu-x86_64-static -cpu cpu`; also its CPU features."""
    cmd = [QEMU, "-cpu", cpu, sys.executable, __file__, str(bundle), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"emulated run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    bundle, out = Path(sys.argv[1]), Path(sys.argv[2])
    result = outputs(bundle)
    result["features"] = np.array([cpu_features()[k] for k in ("AVX2", "AVX512F", "AVX512_VNNI", "AVXVNNI")])
    np.savez(out, **result)


if __name__ == "__main__":
    main()
