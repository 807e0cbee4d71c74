"""Reference SigLIP-NaViT vision encoder (upstream modeling_navit_siglip.py + get_vllm_embedding batching).

Eager float32 torch over a plain weight dict with the upstream `vpm.*` names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..hf_config import MiniCPMOConfig


def pad_strips(strips: Sequence[torch.Tensor], tgt_sizes: Sequence[tuple[int, int]], patch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Strips [3, P, N_i*P] -> pixel batch [B, 3, P, Lmax*P] (zero padded) and patch mask [B, 1, Lmax]."""
    flat = [s.flatten(end_dim=1).permute(1, 0) for s in strips]  # [N_i*P, 3*P]
    padded = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=0.0)  # [B, L, 3P]
    b, length, _ = padded.shape
    pixels = padded.permute(0, 2, 1).reshape(b, 3, -1, length)
    max_patches = max(h * w for h, w in tgt_sizes)
    mask = torch.zeros((b, 1, max_patches), dtype=torch.bool)
    for i, (h, w) in enumerate(tgt_sizes):
        mask[i, 0, : h * w] = True
    return pixels, mask


def navit_position_ids(patch_mask: torch.Tensor, tgt_sizes: torch.Tensor, num_patches_per_side: int
                       ) -> torch.Tensor:
    """Bucketed NaViT position ids [B, Lmax]; padded positions keep 0.

    Uses the upstream tensor expressions on purpose: `1 / nb` with an int32 tensor gives a float32
    step, and the float32 arange/bucketize ties decide which bucket a coordinate lands in.
    """
    side = num_patches_per_side
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    b, _, length = patch_mask.shape
    position_ids = torch.full((b, length), fill_value=0)
    for i, mask in enumerate(patch_mask):
        nb_h, nb_w = tgt_sizes[i][0], tgt_sizes[i][1]
        frac_h = torch.arange(0, 1 - 1e-6, 1 / nb_h)
        frac_w = torch.arange(0, 1 - 1e-6, 1 / nb_w)
        bucket_h = torch.bucketize(frac_h, boundaries, right=True)
        bucket_w = torch.bucketize(frac_w, boundaries, right=True)
        pos = (bucket_h[:, None] * side + bucket_w).flatten()
        position_ids[i][mask.view(-1)] = pos
    return position_ids


def _linear(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _layer_norm(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def _attention(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, mask: torch.Tensor | None,
               heads: int) -> torch.Tensor:
    # x [B, L, D]; mask [B, 1, L, L] additive or None
    b, length, dim = x.shape
    hd = dim // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, heads, hd).transpose(1, 2)  # [B, H, L, hd]

    q = split(_linear(w, f"{name}.q_proj", x))
    k = split(_linear(w, f"{name}.k_proj", x))
    v = split(_linear(w, f"{name}.v_proj", x))
    scores = torch.matmul(q, k.transpose(2, 3)) * hd**-0.5
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, length, dim)
    return _linear(w, f"{name}.out_proj", out)


def _encoder_layer(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, mask: torch.Tensor | None,
                   heads: int, eps: float) -> torch.Tensor:
    x = x + _attention(w, f"{name}.self_attn", _layer_norm(w, f"{name}.layer_norm1", x, eps), mask, heads)
    h = _linear(w, f"{name}.mlp.fc1", _layer_norm(w, f"{name}.layer_norm2", x, eps))
    return x + _linear(w, f"{name}.mlp.fc2", F.gelu(h, approximate="tanh"))


def vpm_forward(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, pixels: torch.Tensor,
                patch_mask: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
    """One vpm call: pixels [B, 3, P, L*P], patch_mask [B, 1, L], tgt_sizes int32 [B, 2] -> [B, L, hidden]."""
    vc = cfg.vision
    conv = F.conv2d(pixels, weights["vpm.embeddings.patch_embedding.weight"],
                    weights["vpm.embeddings.patch_embedding.bias"], stride=vc.patch_size)
    x = conv.flatten(2).transpose(1, 2)  # [B, L, hidden]
    pos = navit_position_ids(patch_mask, tgt_sizes, vc.num_patches_per_side)
    x = x + F.embedding(pos, weights["vpm.embeddings.position_embedding.weight"])

    valid = patch_mask.view(x.shape[0], -1)
    mask = None
    if torch.any(~valid):  # upstream skips the mask when nothing is padded
        keys = valid[:, None, None, :].expand(-1, 1, valid.shape[1], -1).to(x.dtype)
        inverted = 1.0 - keys
        mask = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(x.dtype).min)
    for i in range(cfg.vision_layers_used):
        x = _encoder_layer(weights, f"vpm.encoder.layers.{i}", x, mask, vc.num_attention_heads,
                           vc.layer_norm_eps)
    return _layer_norm(weights, "vpm.post_layernorm", x, vc.layer_norm_eps)


def siglip_forward(weights: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, strips: Sequence[torch.Tensor],
                   tgt_sizes: Sequence[tuple[int, int]], batch_size: int | None = None) -> torch.Tensor:
    """Vision features of all slices: [B, Lmax, hidden], padded rows kept (as upstream last_hidden_state).

    All slices are padded to the global Lmax, then run in chunks of `batch_size`
    (default: config vision_batch_size, 16), as get_vllm_embedding does.
    """
    if len(strips) != len(tgt_sizes) or not strips:
        raise ValueError(f"need one tgt_size per strip, got {len(strips)} strips and {len(tgt_sizes)} sizes")
    pixels, patch_mask = pad_strips(strips, tgt_sizes, cfg.vision.patch_size)
    tgt = torch.tensor(tgt_sizes, dtype=torch.int32)
    step = batch_size or int(cfg.raw.get("vision_batch_size", 16))
    chunks = [vpm_forward(weights, cfg, pixels[i:i + step], patch_mask[i:i + step], tgt[i:i + step])
              for i in range(0, len(strips), step)]
    return torch.cat(chunks, dim=0)
