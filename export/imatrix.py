"""Importance of every decoder linear layer's input channels, measured on calibration text while the
exporter streams the weights (llama.cpp's importance matrix, `llama-imatrix`).

A linear layer's output error is sum_k x_k * dW_k, so a weight error costs in proportion to the square
of the activation it multiplies: the mean of x_k^2 over calibration tokens weights the quantizer's
range search (quant.quantize_weight(importance=...)). The activations come from the checkpoint's own
fp32 weights, pushed through the decoder one layer at a time in numpy, in step with the export:
layer i's weights are read once for its forward pass and its quantization (the reads are cached for
that layer only), so the whole model is never in memory, and no ONNX graph or torch is needed.

    calib = LayerCalibration(cfg, read, sequences)    # token ids, e.g. tokenized calibration text
    imp = calib.advance(i)                            # {"attn/qkv_proj": [D], ..., "mlp/down_proj": [I]}
    head = calib.head_importance()                    # the final norm's output, for the vocabulary head

The calibration text must not be the text a quality measurement scores (benchmarks/quality.py names
its corpus and a separate calibration set).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .hf_config import DecoderConfig

ReadWeight = Callable[[str], np.ndarray]
P = "llm.model.layers.{i}."
MAX_CALIBRATION_TOKENS = 2048  # at 7B, ~15 GFLOP a token in numpy: a few minutes on 2 cores


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps) * w


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on [heads, T, dh] with cos/sin [T, dh/2] (decoder.rotary_cache)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Causal GQA: q [H, T, dh], k/v [Hkv, T, dh] -> [T, H*dh]."""
    heads, t, dh = q.shape
    group = heads // k.shape[0]
    mask = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
    out = np.empty_like(q)
    for h in range(heads):
        s = q[h] @ k[h // group].T * scale + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        out[h] = (s / s.sum(-1, keepdims=True)) @ v[h // group]
    return out.transpose(1, 0, 2).reshape(t, heads * dh)


class LayerCalibration:
    """Calibration sequences' residual streams, one decoder layer further at each `advance`."""

    def __init__(self, cfg: DecoderConfig, read: ReadWeight, sequences: Sequence[np.ndarray]):
        from .decoder import rotary_cache

        self.cfg, self.read = cfg, read
        kept, left = [], MAX_CALIBRATION_TOKENS
        for ids in sequences:
            if left <= 0:
                break
            kept.append(np.asarray(ids, dtype=np.int64)[:left])
            left -= len(kept[-1])
        if not kept or not sum(len(s) for s in kept):
            raise ValueError("calibration needs at least one token")
        table = read("llm.model.embed_tokens.weight")
        self.streams = [table[ids].astype(np.float32) for ids in kept]
        del table
        self.cos, self.sin = rotary_cache(cfg, max(len(s) for s in kept))
        self.tokens = sum(len(s) for s in kept)

    def advance(self, i: int) -> dict[str, np.ndarray]:
        """Run layer i on every stream; the mean square of each of its linear layers' inputs."""
        c, p = self.cfg, P.format(i=i)
        w = {name: self.read(p + name) for name in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.weight",
            "self_attn.v_proj.bias", "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
            "mlp.down_proj.weight")}
        sums = {"attn/qkv_proj": 0.0, "attn/o_proj": 0.0, "mlp/gate_up_proj": 0.0, "mlp/down_proj": 0.0}
        for j, x in enumerate(self.streams):
            t = len(x)
            n = _rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps)
            sums["attn/qkv_proj"] = sums["attn/qkv_proj"] + np.square(n).sum(0)
            q, k, v = ((n @ w[f"self_attn.{m}_proj.weight"].T + w[f"self_attn.{m}_proj.bias"])
                       .reshape(t, -1, c.head_dim).transpose(1, 0, 2) for m in ("q", "k", "v"))
            cos, sin = self.cos[:t], self.sin[:t]
            a = _attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v, c.head_dim ** -0.5)
            sums["attn/o_proj"] = sums["attn/o_proj"] + np.square(a).sum(0)
            x = x + a @ w["self_attn.o_proj.weight"].T
            n2 = _rms_norm(x, w["post_attention_layernorm.weight"], c.rms_norm_eps)
            sums["mlp/gate_up_proj"] = sums["mlp/gate_up_proj"] + np.square(n2).sum(0)
            gate = n2 @ w["mlp.gate_proj.weight"].T
            h = gate / (1 + np.exp(-gate)) * (n2 @ w["mlp.up_proj.weight"].T)
            sums["mlp/down_proj"] = sums["mlp/down_proj"] + np.square(h).sum(0)
            self.streams[j] = x + h @ w["mlp.down_proj.weight"].T
        return {k: (v / self.tokens).astype(np.float32) for k, v in sums.items()}

    def head_importance(self) -> np.ndarray:
        """The mean square of the final norm's output: the vocabulary head's input."""
        w = self.read("llm.model.norm.weight")
        total = sum(np.square(_rms_norm(x, w, self.cfg.rms_norm_eps)).sum(0) for x in self.streams)
        return (total / self.tokens).astype(np.float32)


class LayerReadCache:
    """`read` with the current layer's tensors kept: calibration and quantization read them once."""

    def __init__(self, read: ReadWeight):
        self._read, self._cache, self._prefix = read, {}, None

    def start_layer(self, i: int) -> None:
        self._cache, self._prefix = {}, P.format(i=i)

    def __call__(self, name: str) -> np.ndarray:
        if self._prefix and name.startswith(self._prefix):
            if name not in self._cache:
                self._cache[name] = self._read(name)
            return self._cache[name]
        return self._read(name)
