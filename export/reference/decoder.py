"""Reference Qwen2 decoder (transformers Qwen2ForCausalLM math) over a plain `llm.*` weight dict.

RMSNorm -> GQA attention (q/k/v bias, rotate-half RoPE) -> residual -> RMSNorm -> SwiGLU -> residual,
final RMSNorm, lm_head. Float32, eager. An optional list-of-(k, v) cache makes greedy decoding cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F

from ..hf_config import DecoderConfig, MiniCPMOConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k, v [1, kv_heads, T, head_dim]


def _dec(cfg: MiniCPMOConfig | DecoderConfig) -> DecoderConfig:
    return cfg.decoder if isinstance(cfg, MiniCPMOConfig) else cfg


def embed(weights: Mapping[str, torch.Tensor], ids: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """Token ids [T] -> embeddings [1, T, D] (no scale: Qwen2 has no scale_emb)."""
    ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    return F.embedding(ids.view(1, -1), weights["llm.model.embed_tokens.weight"])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim] (default inv_freq, halves repeated)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [1, H, T, hd]; cos, sin [T, hd]
    return x * cos + rotate_half(x) * sin


def _attention(w: Mapping[str, torch.Tensor], p: str, x: torch.Tensor, cfg: DecoderConfig,
               cos: torch.Tensor, sin: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    # x [1, T, D] -> [1, T, D], plus the layer's full k, v
    _, t, dim = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def proj(name: str, heads: int) -> torch.Tensor:
        y = F.linear(x, w[f"{p}.{name}.weight"], w.get(f"{p}.{name}.bias"))
        return y.view(1, t, heads, hd).transpose(1, 2)  # [1, heads, T, hd]

    q = apply_rope(proj("q_proj", nh), cos, sin)
    k = apply_rope(proj("k_proj", nkv), cos, sin)
    v = proj("v_proj", nkv)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    groups = nh // nkv
    kr, vr = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, kr.transpose(2, 3)) / hd**0.5  # [1, H, T, S]
    s = kr.shape[2]
    # query i (absolute position s - t + i) sees keys 0..s - t + i
    causal = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs, vr).transpose(1, 2).reshape(1, t, dim)
    return F.linear(out, w[f"{p}.o_proj.weight"], w.get(f"{p}.o_proj.bias")), (k, v)


def _mlp(w: Mapping[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    gate = F.linear(x, w[f"{p}.gate_proj.weight"])
    up = F.linear(x, w[f"{p}.up_proj.weight"])
    return F.linear(F.silu(gate) * up, w[f"{p}.down_proj.weight"])


def lm_head_weight(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig | DecoderConfig) -> torch.Tensor:
    if _dec(cfg).tie_word_embeddings:
        return weights["llm.model.embed_tokens.weight"]
    return weights["llm.lm_head.weight"]


def decoder_hidden(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig | DecoderConfig,
                   inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """inputs_embeds [1, T, D] -> final-norm hidden states [1, T, D].

    With `cache` (a list, empty at first) positions continue after the cached length and the
    list is updated in place with every layer's k, v.
    """
    dc = _dec(cfg)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be [1, T, D], got {tuple(inputs_embeds.shape)}")
    past_layers = list(cache) if cache else []  # snapshot: the loop below appends to `cache`
    offset = past_layers[0][0].shape[2] if past_layers else 0
    t = inputs_embeds.shape[1]
    cos, sin = rope_cos_sin(torch.arange(offset, offset + t), dc.head_dim, dc.rope_theta)
    x = inputs_embeds
    for i in range(dc.num_hidden_layers):
        p = f"llm.model.layers.{i}"
        past = past_layers[i] if past_layers else None
        h, kv = _attention(weights, f"{p}.self_attn", rms_norm(x, weights[f"{p}.input_layernorm.weight"],
                                                                 dc.rms_norm_eps), dc, cos, sin, past)
        if cache is not None:
            if len(cache) > i:
                cache[i] = kv
            else:
                cache.append(kv)
        x = x + h
        x = x + _mlp(weights, f"{p}.mlp", rms_norm(x, weights[f"{p}.post_attention_layernorm.weight"],
                                                   dc.rms_norm_eps))
    return rms_norm(x, weights["llm.model.norm.weight"], dc.rms_norm_eps)


def decoder_forward(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig | DecoderConfig,
                    inputs_embeds: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """inputs_embeds [1, T, D] -> logits [1, T, V]; positions 0..T-1 (or after the cache)."""
    return F.linear(decoder_hidden(weights, cfg, inputs_embeds, cache), lm_head_weight(weights, cfg))


def greedy_generate(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig | DecoderConfig,
                    inputs_embeds: torch.Tensor, max_new_tokens: int, stop_ids: Iterable[int] = ()
                    ) -> list[int]:
    """Argmax decoding from a prompt of embeddings [1, T, D].

    Returns the new token ids; a stop token, when produced, is included as the last id (like the
    HF `generate` sequences). Ties go to the lowest id (torch.argmax).
    """
    stops = set(stop_ids)
    cache: KVCache = []
    logits = decoder_forward(weights, cfg, inputs_embeds, cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits[0, -1]))
        out.append(token)
        if token in stops:
            break
        logits = decoder_forward(weights, cfg, embed(weights, [token]), cache)
    return out
