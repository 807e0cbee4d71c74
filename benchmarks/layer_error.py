"""One decoder layer's output error on real activations, per 4-bit quantizer: a fast proxy for KL.

    python -m benchmarks.layer_error CHECKPOINT [--layer 3] [--tokens 1024]

Calibration text (benchmarks.quality's calibration set, never its corpus) runs through the checkpoint's
fp32 layers in numpy (export/imatrix.py) up to `--layer`; the inputs of that layer's q_proj and
down_proj are kept. The first half of the tokens gives the importance matrix; on the second half each
quantizer is scored by ||X (W - W_hat)^T|| / ||X W^T||. Quantizers: round-to-nearest, the search by
plain squared error (importance all ones), the default search (weighted by rms(block) + |w|), the
importance-weighted search, and llama.cpp's Q4_0 written out in numpy (symmetric, 32 weights per fp16
scale, the largest-magnitude weight at -8).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from minicpmo.export import imatrix
from minicpmo.export.checkpoint import open_checkpoint
from minicpmo.export.hf_config import load_config
from minicpmo.export.quant import dequantize_weight, quantize_weight
from minicpmo.runtime.bench import isa
from minicpmo.runtime.tokenizer import Tokenizer

from .quality import calibration_text


def q4_0(w: np.ndarray) -> np.ndarray:
    """W dequantized from llama.cpp's Q4_0 (quantize_row_q4_0_ref)."""
    b = w.reshape(w.shape[0], -1, 32)
    peak = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    d = (peak / -8).astype(np.float16).astype(np.float32)
    inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
    q = np.clip(np.floor(b * inv + 8.5), 0, 15)
    return ((q - 8) * d).reshape(w.shape)


def layer_inputs(calib: imatrix.LayerCalibration, i: int) -> dict[str, np.ndarray]:
    """The inputs [T, K] of layer i's q_proj and down_proj (the streams must stand before layer i)."""
    cfg, read, p = calib.cfg, calib.read, imatrix.P.format(i=i)
    out = {"self_attn.q_proj": [], "mlp.down_proj": []}
    for x in calib.streams:
        t = len(x)
        n = imatrix._rms_norm(x, read(p + "input_layernorm.weight"), cfg.rms_norm_eps)
        out["self_attn.q_proj"].append(n)
        q, k, v = ((n @ read(p + f"self_attn.{m}_proj.weight").T + read(p + f"self_attn.{m}_proj.bias"))
                   .reshape(t, -1, cfg.head_dim).transpose(1, 0, 2) for m in "qkv")
        cos, sin = calib.cos[:t], calib.sin[:t]
        a = imatrix._attention(imatrix._rotate(q, cos, sin), imatrix._rotate(k, cos, sin), v, cfg.head_dim ** -0.5)
        x = x + a @ read(p + "self_attn.o_proj.weight").T
        n2 = imatrix._rms_norm(x, read(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = n2 @ read(p + "mlp.gate_proj.weight").T
        out["mlp.down_proj"].append(gate / (1 + np.exp(-gate)) * (n2 @ read(p + "mlp.up_proj.weight").T))
    return {k: np.concatenate(v) for k, v in out.items()}


def quantizers(w: np.ndarray, imp: np.ndarray, block: int) -> dict[str, np.ndarray]:
    ones = np.ones(w.shape[1], np.float32)
    return {f"b{block}-rtn": dequantize_weight(quantize_weight(w, 4, block, clip_ratios=(1.0,))),
            f"b{block}-plain-mse-search": dequantize_weight(quantize_weight(w, 4, block, importance=ones)),
            f"b{block}-search": dequantize_weight(quantize_weight(w, 4, block)),
            f"b{block}-imatrix": dequantize_weight(quantize_weight(w, 4, block, importance=imp))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--blocks", default="32,64,128")
    args = ap.parse_args(argv)
    ckpt = open_checkpoint(args.checkpoint)
    cfg = load_config(args.checkpoint).decoder
    ids = np.array(Tokenizer(f"{args.checkpoint}/tokenizer.json").encode(calibration_text())[: args.tokens])
    half = len(ids) // 2
    calib = imatrix.LayerCalibration(cfg, lambda n: ckpt.read(n).astype(np.float32), [ids[:half], ids[half:]])
    for i in range(args.layer):
        calib.advance(i)
    result = {"host_isa": isa(), "layer": args.layer, "tokens": len(ids), "tensors": {}}
    for name, x in layer_inputs(calib, args.layer).items():
        w = ckpt.read(f"llm.model.layers.{args.layer}.{name}.weight").astype(np.float32)
        fit, held = x[:half], x[half:]
        ref = np.linalg.norm(held @ w.T)
        deq = {"q4_0": q4_0(w)}
        for block in map(int, args.blocks.split(",")):
            deq.update(quantizers(w, np.mean(np.square(fit), 0), block))
        result["tensors"][name] = {k: float(np.linalg.norm(held @ (w - v).T) / ref) for k, v in deq.items()}
        print(name, json.dumps({k: round(v, 4) for k, v in result["tensors"][name].items()}), file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
