"""Static scales for an int8 KV cache, measured by running the exported bundle on calibration prompts.

ONNX Runtime's int8 GroupQueryAttention takes one scale per layer, KV head and channel, fixed when the
graph is written. The export runs the finished fp32-cache bundle through the runtime's own Pipeline on
a few conversations (text, an image, a clip when the bundle has audio; each with a greedy reply, so
generated positions count too) and takes per channel the largest magnitude the cache held:

- values: max |v|;
- keys: the cache holds keys after rotary, which mixes channel j with channel j + d/2 at an angle
  that depends on the position. Their pair norm sqrt(k_j^2 + k_{j+d/2}^2) does not, so its maximum
  bounds both channels at every position, including positions past the calibration prompts.

scale = MARGIN * bound / 127. A value past the bound saturates at +-127 instead of wrapping.
The built-in prompts are short; `--kv-calibration-text FILE` adds the user's own (one prompt per
paragraph), which is what a real deployment should calibrate on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
MARGIN = 1.25
MAX_REPLY_TOKENS = 24
# A calibration file's paragraphs, at most: each is a prompt and a short reply (~1 s at 1.5B, ~5 s at
# 7B on 2 cores), and the scales are maxima, which a few dozen varied prompts already reach; a long
# file (a book, a source tree) is sampled evenly rather than read to the end.
MAX_CALIBRATION_PARAGRAPHS = 64
BUILTIN_TEXT = (
    "The river that runs past the old mill has flooded twice this spring. Farmers downstream moved "
    "their cattle to higher ground, and the town council met on Tuesday to discuss a new levee. "
    "Engineers estimate the project would take two years and cost about forty million dollars. "
    "Summarise the situation in two sentences and suggest one question the council should ask.",
    "请用中文简要介绍一下长城的历史，并说明它在今天的意义。Then answer in English as well: which three "
    "facts would a visitor find most surprising?",
    "Write a short Python function that returns the n-th Fibonacci number, and explain its running time.",
)


@dataclass
class KVScales:
    keys: list[np.ndarray]  # per layer [1, kv_heads, 1, head_dim] float32
    values: list[np.ndarray]
    summary: dict


def calibration_conversations(text_file: str | Path | None, audio: bool) -> list[list[dict]]:
    """The prompts: the built-in set, an image, a clip (with audio), then the user's paragraphs."""
    convs = [[{"role": "user", "content": t}] for t in BUILTIN_TEXT]
    convs.append([{"role": "user", "content": [{"type": "image", "image": calibration_image()},
                                               {"type": "text", "text": "Describe this picture in detail."}]}])
    if audio:
        convs.append([{"role": "user", "content": [{"type": "audio", "audio": calibration_clip()},
                                                   {"type": "text", "text": "What do you hear?"}]}])
    if text_file is not None:
        paragraphs = [p.strip() for p in Path(text_file).read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not paragraphs:
            raise ValueError(f"{text_file}: no text to calibrate on")
        if len(paragraphs) > MAX_CALIBRATION_PARAGRAPHS:
            picks = np.linspace(0, len(paragraphs) - 1, MAX_CALIBRATION_PARAGRAPHS).round().astype(int)
            log.info("KV calibration: %d of the %d paragraphs of %s, spread over the file",
                     MAX_CALIBRATION_PARAGRAPHS, len(paragraphs), text_file)
            paragraphs = [paragraphs[i] for i in picks]
        convs += [[{"role": "user", "content": p}] for p in paragraphs]
    return convs


def calibration_image(width: int = 896, height: int = 448) -> Image.Image:
    """A deterministic picture with smooth regions, edges and texture (two slices and an overview)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 23.0) * np.cos(y / 17.0)], axis=-1)
    rgb[(x - width * 0.3) ** 2 + (y - height * 0.5) ** 2 < (height * 0.3) ** 2] = (0.9, 0.2, 0.1)
    rgb[int(height * 0.2):int(height * 0.7), int(width * 0.6):int(width * 0.85)] = (0.1, 0.3, 0.8)
    noise = np.random.default_rng(0).uniform(-0.05, 0.05, rgb.shape).astype(np.float32)
    return Image.fromarray((np.clip(rgb + noise, 0, 1) * 255).astype(np.uint8))


def calibration_clip(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    """A rising tone with a little noise: float32 mono 16 kHz, as the pipeline takes audio."""
    t = np.arange(int(seconds * rate), dtype=np.float32) / rate
    chirp = 0.4 * np.sin(2 * np.pi * (200 * t + 300 * t * t))
    return (chirp + 0.02 * np.random.default_rng(0).standard_normal(t.shape)).astype(np.float32)


def measure_kv_scales(bundle: Path, conversations: list[list[dict]], threads: int | None = None) -> KVScales:
    """Run each conversation on the bundle's fp32 cache; the scales cover every value it held."""
    from ..runtime.errors import InputError
    from ..runtime.pipeline import Pipeline
    from ..runtime.types import GenerationParams

    pipe = Pipeline.load(bundle, provider="cpu", threads=threads)
    kv = pipe.kv
    key_bound = value_bound = None
    positions = 0
    for n, messages in enumerate(conversations, 1):
        kv.reset()
        try:
            for _ in pipe.generate(messages, GenerationParams(max_tokens=MAX_REPLY_TOKENS)):
                pass
        except InputError as e:  # e.g. a calibration paragraph longer than the context
            raise ValueError(f"calibration prompt {n} of {len(conversations)}: {e}") from e
        positions += kv.length
        layers = [kv.layer(i) for i in range(kv.num_layers)]
        k_now = np.stack([_pair_norm_max(k) for k, _ in layers])  # [layers, kv_heads, head_dim]
        v_now = np.stack([np.abs(v).max(axis=1) for _, v in layers])
        key_bound = k_now if key_bound is None else np.maximum(key_bound, k_now)
        value_bound = v_now if value_bound is None else np.maximum(value_bound, v_now)
    return KVScales(_scales(key_bound), _scales(value_bound), {
        "conversations": len(conversations), "positions": positions, "margin": MARGIN,
        "key_bound_max": round(float(key_bound.max()), 4), "value_bound_max": round(float(value_bound.max()), 4)})


def _scales(bound: np.ndarray) -> list[np.ndarray]:
    """[layers, kv_heads, d] bounds -> per layer [1, kv_heads, 1, d] scales (a zero channel gets a tiny one)."""
    return [(MARGIN * np.maximum(b, 1e-6) / 127).astype(np.float32)[None, :, None, :] for b in bound]


def _pair_norm_max(keys: np.ndarray) -> np.ndarray:
    """keys [kv_heads, length, d] -> per channel [kv_heads, d]: max over positions of the rotary pair norm."""
    half = keys.shape[-1] // 2
    norm = np.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).max(axis=1)
    return np.concatenate([norm, norm], axis=-1)
