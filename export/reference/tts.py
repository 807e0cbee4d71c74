"""Reference speech model (the parity yardstick): upstream ConditionalChatTTS, DVAE decoder and Vocos
as eager float32 PyTorch over plain weight dicts with the upstream names.

Written from the math of modeling_minicpmo.py (ConditionalChatTTS.merge_inputs_embeds, prefill_text,
generate, make_streaming_chunk_mask_generation, DVAE, GFSQ over vector_quantize_pytorch's
GroupedResidualFSQ) and of the vocos package (VocosBackbone, ISTFTHead, ISTFT with "same" padding).
Never imported by the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..tts_config import TTSConfig
from .decoder import apply_rope, rms_norm, rope_cos_sin

W = Mapping[str, torch.Tensor]
KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [1, heads, T, head_dim]
FSQ_LEVELS = (5, 5, 5, 5)


# ---------------------------------------------------------------- TTS Llama

def speaker_embedding(w: W, hidden: torch.Tensor) -> torch.Tensor:
    """tts.projector (Linear, ReLU, Linear) then L2 normalization over the last axis."""
    x = F.relu(F.linear(hidden, w["tts.projector.linear1.weight"], w["tts.projector.linear1.bias"]))
    x = F.linear(x, w["tts.projector.linear2.weight"], w["tts.projector.linear2.bias"])
    return F.normalize(x, p=2, dim=-1)


def text_embeds(w: W, cfg: TTSConfig, ids: torch.Tensor, spk_emb: torch.Tensor | None) -> torch.Tensor:
    """emb_text rows of ids [T] -> [1, T, D], the speaker vector over every [spk_emb] row."""
    x = F.embedding(ids.view(1, -1), w["tts.emb_text.weight"]).clone()
    where = ids == cfg.spk_emb_token_id
    if where.any():
        x[0, where] = spk_emb.to(x.dtype)
    return x


def code_embeds(w: W, cfg: TTSConfig, codes: torch.Tensor) -> torch.Tensor:
    """codes [T, num_vq] -> the sum of each stream's emb_code row, [1, T, D]."""
    return sum(F.embedding(codes[:, q], w[f"tts.emb_code.{q}.weight"]) for q in range(cfg.num_vq)).unsqueeze(0)


def head_weight(w: W, q: int) -> torch.Tensor:
    """weight_norm(dim=0): W = g * v / ||v|| with the norm over each output row."""
    g = w[f"tts.head_code.{q}.parametrizations.weight.original0"]
    v = w[f"tts.head_code.{q}.parametrizations.weight.original1"]
    return g * v / v.norm(dim=1, keepdim=True)


def _layer(w: W, cfg: TTSConfig, i: int, x, cos, sin, bias, past):
    p = f"tts.model.layers.{i}"
    _, t, d = x.shape
    h, hd = cfg.num_attention_heads, cfg.head_dim
    n = rms_norm(x, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)

    def heads(name):
        return F.linear(n, w[f"{p}.self_attn.{name}.weight"]).view(1, t, h, hd).transpose(1, 2)

    q, k, v = apply_rope(heads("q_proj"), cos, sin), apply_rope(heads("k_proj"), cos, sin), heads("v_proj")
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + bias
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, d)
    x = x + F.linear(attn, w[f"{p}.self_attn.o_proj.weight"])
    n = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
    mlp = F.silu(F.linear(n, w[f"{p}.mlp.gate_proj.weight"])) * F.linear(n, w[f"{p}.mlp.up_proj.weight"])
    return x + F.linear(mlp, w[f"{p}.mlp.down_proj.weight"]), (k, v)


def tts_forward(w: W, cfg: TTSConfig, embeds: torch.Tensor, cache: KVCache | None,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
    """embeds [1, S, D] at positions len(cache).. -> logits [1, S, num_vq, 626] and the grown cache.
    bias: additive [1, 1, S, total] (None: causal)."""
    past = cache[0][0].shape[2] if cache else 0
    s = embeds.shape[1]
    if bias is None:
        bias = torch.full((s, past + s), float("-inf")).triu(past + 1).view(1, 1, s, past + s)
    cos, sin = rope_cos_sin(torch.arange(past, past + s), cfg.head_dim, cfg.rope_theta)
    x, new_cache = embeds, []
    for i in range(cfg.num_hidden_layers):
        x, kv = _layer(w, cfg, i, x, cos, sin, bias, cache[i] if cache else None)
        new_cache.append(kv)
    x = rms_norm(x, w["tts.model.norm.weight"], cfg.rms_norm_eps)
    logits = torch.stack([F.linear(x, head_weight(w, q)) for q in range(cfg.num_vq)], dim=2)
    return logits, new_cache


def generation_bias(cfg: TTSConfig, past: int, text_mask: torch.Tensor) -> torch.Tensor:
    """Upstream make_streaming_chunk_mask_generation for one new position after `past` cached ones:
    text beyond the chunks unlocked so far (10 more per 50 codes) and padding are hidden. [1, 1, 1, past + 1]"""
    lead = 1 + cfg.num_spk_embs
    reserved = cfg.streaming_text_reserved_len
    bias = torch.zeros(past + 1)
    unlocked = math.ceil((past - reserved) / cfg.streaming_audio_chunk_size) * cfg.streaming_text_chunk_size
    start = min(unlocked, reserved) + lead
    bias[start:reserved + lead + 1] = torch.finfo(torch.float32).min
    cond = bias[:reserved + lead + 1]
    cond[text_mask == 0] = torch.finfo(torch.float32).min
    return bias.view(1, 1, 1, -1)


def condition_cache(w: W, cfg: TTSConfig, ids: torch.Tensor, spk_emb: torch.Tensor) -> KVCache:
    """Upstream's text prefill: positions 0 .. condition_length - 2, chunk by chunk (12, then 10)."""
    embeds = text_embeds(w, cfg, ids[:cfg.condition_length - 1], spk_emb)
    cache, lead = None, 1 + cfg.num_spk_embs
    bounds = [0, *range(lead + cfg.streaming_text_chunk_size, cfg.condition_length - 1, cfg.streaming_text_chunk_size),
              cfg.condition_length - 1]
    for a, b in zip(bounds, bounds[1:], strict=False):
        _, cache = tts_forward(w, cfg, embeds[:, a:b], cache)
    return cache


def teacher_forced_logits(w: W, cfg: TTSConfig, ids: torch.Tensor, mask: torch.Tensor, spk_emb: torch.Tensor,
                          codes: torch.Tensor) -> torch.Tensor:
    """Logits [N, num_vq, 626] of N steps: the audio bos, then codes[0 .. N-2] fed one per step."""
    cache = condition_cache(w, cfg, ids, spk_emb)
    bos = F.embedding(torch.tensor([[cfg.audio_bos_token_id]]), w["tts.emb_text.weight"])
    out = []
    for n in range(codes.shape[0]):
        x = bos if n == 0 else code_embeds(w, cfg, codes[n - 1:n])
        past = cache[0][0].shape[2]
        logits, cache = tts_forward(w, cfg, x, cache, generation_bias(cfg, past, mask))
        out.append(logits[0, -1])
    return torch.stack(out)


def greedy_codes(w: W, cfg: TTSConfig, ids, mask, spk_emb, steps: int) -> torch.Tensor:
    """Argmax decoding of `steps` code frames (no end rule): [steps, num_vq]."""
    cache = condition_cache(w, cfg, ids, spk_emb)
    x = F.embedding(torch.tensor([[cfg.audio_bos_token_id]]), w["tts.emb_text.weight"])
    codes = []
    for _ in range(steps):
        logits, cache = tts_forward(w, cfg, x, cache, generation_bias(cfg, cache[0][0].shape[2], mask))
        codes.append(logits[0, -1].argmax(-1))
        x = code_embeds(w, cfg, codes[-1].view(1, -1))
    return torch.stack(codes)


# ---------------------------------------------------------------- DVAE decoder

def _convnext(x: torch.Tensor, w: W, p: str, dilation: int, scale: str) -> torch.Tensor:
    """ConvNeXt block on [1, C, T]: depthwise conv, LayerNorm, Linear, GELU, Linear, layer scale, residual."""
    c = x.shape[1]
    y = F.conv1d(x, w[f"{p}.dwconv.weight"], w[f"{p}.dwconv.bias"], padding=3 * dilation, dilation=dilation, groups=c)
    y = F.layer_norm(y.transpose(1, 2), (c,), w[f"{p}.norm.weight"], w[f"{p}.norm.bias"], eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, w[f"{p}.pwconv1.weight"], w[f"{p}.pwconv1.bias"])),
                 w[f"{p}.pwconv2.weight"], w[f"{p}.pwconv2.bias"])
    return x + (y * w[f"{p}.{scale}"]).transpose(1, 2)


def fsq_codebook() -> torch.Tensor:
    """FSQ levels (5,5,5,5): code index -> the 4 values in [-1, 1], [625, 4] (mixed-radix digits)."""
    idx = torch.arange(math.prod(FSQ_LEVELS))
    digits, basis = [], 1
    for level in FSQ_LEVELS:
        digits.append((idx // basis) % level)
        basis *= level
    half = torch.tensor([lv // 2 for lv in FSQ_LEVELS], dtype=torch.float32)
    return (torch.stack(digits, -1).float() - half) / half


def gfsq_dequantize(w: W, codes: torch.Tensor) -> torch.Tensor:
    """codes [1, 4, T] (stream q = group q // 2, residual q % 2) -> features [1, vq_dim, T]."""
    book, groups = fsq_codebook(), []
    for g in range(2):
        summed = sum(book[codes[0, 2 * g + r]] * (FSQ_LEVELS[0] - 1) ** -r for r in range(2))  # [T, 4]
        p = f"tts.dvae.vq_layer.quantizer.rvqs.{g}"
        groups.append(F.linear(summed, w[f"{p}.project_out.weight"], w[f"{p}.project_out.bias"]))
    return torch.cat(groups, dim=-1).T.unsqueeze(0)


def dvae_decode(w: W, codes: torch.Tensor) -> torch.Tensor:
    """codes [1, 4, T] -> mel [1, 100, 2T] (upstream DVAE.forward, mode decode)."""
    feats = gfsq_dequantize(w, codes)
    b, c, t = feats.shape
    x = feats.view(b, 2, c // 2, t).permute(0, 2, 3, 1).flatten(2)  # the two groups interleaved in time
    p = "tts.dvae.decoder"
    x = F.conv1d(x, w[f"{p}.conv_in.0.weight"], w[f"{p}.conv_in.0.bias"], padding=1)
    x = F.conv1d(F.gelu(x), w[f"{p}.conv_in.2.weight"], w[f"{p}.conv_in.2.bias"], padding=1)
    j = 0
    while f"{p}.decoder_block.{j}.coef" in w:
        x = _convnext(x, w, f"{p}.decoder_block.{j}", dilation=2, scale="coef")
        j += 1
    x = F.conv1d(x, w[f"{p}.conv_out.weight"])
    return F.conv1d(x, w["tts.dvae.out_conv.weight"], padding=1) * w["tts.dvae.coef"]


# ---------------------------------------------------------------- Vocos

def vocos_decode(s: W, mel: torch.Tensor, hop: int = 256) -> torch.Tensor:
    """mel [1, 100, F] -> waveform [1, F * hop] (Vocos.decode: backbone, ISTFT head, "same" ISTFT)."""
    x = F.conv1d(mel, s["backbone.embed.weight"], s["backbone.embed.bias"], padding=3)
    dim = x.shape[1]
    x = F.layer_norm(x.transpose(1, 2), (dim,), s["backbone.norm.weight"], s["backbone.norm.bias"], eps=1e-6)
    x = x.transpose(1, 2)
    i = 0
    while f"backbone.convnext.{i}.gamma" in s:
        x = _convnext(x, s, f"backbone.convnext.{i}", dilation=1, scale="gamma")
        i += 1
    x = F.layer_norm(x.transpose(1, 2), (dim,), s["backbone.final_layer_norm.weight"],
                     s["backbone.final_layer_norm.bias"], eps=1e-6)
    out = F.linear(x, s["head.out.weight"], s["head.out.bias"]).transpose(1, 2)
    log_mag, phase = out.chunk(2, dim=1)
    spec = torch.exp(log_mag).clip(max=1e2) * torch.exp(1j * phase)
    return istft_same(spec, s["head.istft.window"], hop)


def istft_same(spec: torch.Tensor, window: torch.Tensor, hop: int) -> torch.Tensor:
    """Inverse STFT with Vocos's "same" padding: irfft per frame, windowed overlap-add, divided by the
    summed squared window, (n_fft - hop) / 2 samples cut from each end."""
    n_fft = window.shape[0]
    frames = torch.fft.irfft(spec, n_fft, dim=1) * window[None, :, None]  # [1, n_fft, F]
    count = frames.shape[-1]
    length = (count - 1) * hop + n_fft
    y = torch.zeros(length)
    env = torch.zeros(length)
    for f in range(count):
        y[f * hop:f * hop + n_fft] += frames[0, :, f]
        env[f * hop:f * hop + n_fft] += window.square()
    pad = (n_fft - hop) // 2
    return (y[pad:-pad] / env[pad:-pad]).unsqueeze(0)
