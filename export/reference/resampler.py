"""Reference perceiver resampler (upstream resampler.py): 64 learned queries attend over one slice.

The 2-D sin-cos table is computed in numpy float32 exactly as upstream; the attention is the
torch nn.MultiheadAttention math (packed in_proj, -inf key padding, softmax, out_proj) written out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..hf_config import MiniCPMOConfig

LN_EPS = 1e-6  # hard-coded in upstream Resampler, not read from config
DEFAULT_MAX_SIZE = (70, 70)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    # pos [H, W] -> [H, W, dim]: sin(pos*omega) then cos(pos*omega)
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("hw,d->hwd", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def get_2d_sincos_pos_embed(embed_dim: int, size: tuple[int, int]) -> np.ndarray:
    """Table [H, W, D] = concat(sincos(x), sincos(y)): the x (width) coordinate comes first."""
    grid_h = np.arange(size[0], dtype=np.float32)
    grid_w = np.arange(size[1], dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # grid[0] = x, grid[1] = y
    emb_x = _sincos_1d(embed_dim // 2, grid[0])
    emb_y = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_x, emb_y], axis=-1)


def _layer_norm(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS)


def _mha(w: Mapping[str, torch.Tensor], q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
         key_padding_mask: torch.Tensor, heads: int) -> torch.Tensor:
    # q_in [Q, B, D]; k_in, v_in [L, B, D]; key_padding_mask [B, L] True = ignore -> [Q, B, D]
    tgt_len, bsz, dim = q_in.shape
    src_len = k_in.shape[0]
    hd = dim // heads
    wq, wk, wv = w["resampler.attn.in_proj_weight"].chunk(3)
    bq, bk, bv = w["resampler.attn.in_proj_bias"].chunk(3)
    q = F.linear(q_in, wq, bq).view(tgt_len, bsz * heads, hd).transpose(0, 1)  # [B*H, Q, hd]
    k = F.linear(k_in, wk, bk).view(src_len, bsz * heads, hd).transpose(0, 1)  # [B*H, L, hd]
    v = F.linear(v_in, wv, bv).view(src_len, bsz * heads, hd).transpose(0, 1)
    mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype).masked_fill_(key_padding_mask, float("-inf"))
    mask = mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
    scores = torch.baddbmm(mask, q / hd**0.5, k.transpose(-2, -1))  # [B*H, Q, L]
    out = torch.bmm(F.softmax(scores, dim=-1), v)  # [B*H, Q, hd]
    out = out.transpose(0, 1).contiguous().view(tgt_len * bsz, dim)
    out = F.linear(out, w["resampler.attn.out_proj.weight"], w["resampler.attn.out_proj.bias"])
    return out.view(tgt_len, bsz, dim)


def resampler_forward(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, x: torch.Tensor,
                      tgt_sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Vision features x [B, L, kv_dim] (padded rows ignored) -> [B, query_num, hidden]."""
    bsz, length, _ = x.shape
    dim = cfg.decoder.hidden_size
    if len(tgt_sizes) != bsz:
        raise ValueError(f"{bsz} feature rows but {len(tgt_sizes)} tgt_sizes")
    max_h = max([DEFAULT_MAX_SIZE[0]] + [h for h, _ in tgt_sizes])
    max_w = max([DEFAULT_MAX_SIZE[1]] + [w for _, w in tgt_sizes])
    table = torch.from_numpy(get_2d_sincos_pos_embed(dim, (max_h, max_w))).float()

    key_padding_mask = torch.zeros((bsz, length), dtype=torch.bool)
    pos_embed = torch.zeros((bsz, length, dim))
    for i, (h, w) in enumerate(tgt_sizes):
        pos_embed[i, : h * w] = table[:h, :w].reshape(h * w, dim)
        key_padding_mask[i, h * w:] = True

    kv_weight = weights.get("resampler.kv_proj.weight")  # absent (Identity) when kv_dim == hidden
    kv = F.linear(x, kv_weight) if kv_weight is not None else x
    kv = _layer_norm(weights, "resampler.ln_kv", kv).permute(1, 0, 2)  # [L, B, D]
    q = _layer_norm(weights, "resampler.ln_q", weights["resampler.query"])  # [Q, D]
    q = q.unsqueeze(1).repeat(1, bsz, 1)  # [Q, B, D]
    out = _mha(weights, q, kv + pos_embed.permute(1, 0, 2), kv, key_padding_mask, cfg.resampler_heads)
    out = _layer_norm(weights, "resampler.ln_post", out.permute(1, 0, 2))  # [B, Q, D]
    return out @ weights["resampler.proj"]
