"""PyTorch eager, fp32 or bf16: a small Qwen2 loop over the checkpoint's `llm.*` weights.

The math is export/reference/decoder.py's (RMSNorm, GQA with q/k/v bias, rotate-half RoPE, SwiGLU),
written for speed the way transformers runs it: a preallocated KV cache written in place,
scaled_dot_product_attention with GQA, norms computed in fp32, the head on the last position only.
(The reference itself concatenates its cache every step and mixes fp32 softmax with bf16 values.)
"""

from __future__ import annotations

import logging
from pathlib import Path

from .common import Protocol, kv_bytes_per_position, peak_rss_bytes, prompt_ids, run_repeats

log = logging.getLogger("benchmarks.torch")
DTYPES = ("fp32", "bf16")


class TorchQwen2:
    def __init__(self, ckpt_dir: Path, dtype: str, max_len: int):
        import torch

        from minicpmo.export.checkpoint import open_checkpoint

        ckpt = open_checkpoint(ckpt_dir)
        self.torch, self.cfg = torch, ckpt.config.decoder
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        self.w = {n[len("llm."):]: torch.from_numpy(ckpt.read(n)).to(self.dtype)
                  for n in ckpt.keys() if n.startswith("llm.")}
        c = self.cfg
        shape = (c.num_hidden_layers, 1, c.num_key_value_heads, max_len, c.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        dh = c.head_dim
        self.inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
        self.head = self.w["lm_head.weight" if "lm_head.weight" in self.w else "model.embed_tokens.weight"]

    @property
    def weight_bytes_per_token(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.w.items() if "embed_tokens" not in n)

    def _norm(self, x, weight):
        xf = x.float()
        xf = xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * xf.to(self.dtype)

    def _rope(self, pos0: int, t: int):
        freqs = self.torch.arange(pos0, pos0 + t).float()[:, None] * self.inv_freq[None, :]
        emb = self.torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, ids: list[int], pos0: int):
        """ids [T] at positions pos0.. (T > 1 only from an empty cache) -> last logits [V]."""
        torch, F, c, w = self.torch, self.torch.nn.functional, self.cfg, self.w
        t, hd = len(ids), c.head_dim
        x = F.embedding(torch.tensor([ids]), w["model.embed_tokens.weight"])  # [1, T, D]
        cos, sin = self._rope(pos0, t)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, w[p + "input_layernorm.weight"])

            def proj(name, heads, h=h, p=p):
                y = F.linear(h, w[p + f"self_attn.{name}.weight"], w.get(p + f"self_attn.{name}.bias"))
                return y.view(1, t, heads, hd).transpose(1, 2)  # [1, heads, T, hd]

            q, k = _rope(proj("q_proj", c.num_attention_heads), cos, sin), _rope(proj("k_proj", c.num_key_value_heads), cos, sin)
            self.k[i, :, :, pos0:pos0 + t], self.v[i, :, :, pos0:pos0 + t] = k, proj("v_proj", c.num_key_value_heads)
            att = F.scaled_dot_product_attention(q, self.k[i, :, :, :pos0 + t], self.v[i, :, :, :pos0 + t],
                                                 is_causal=t > 1, enable_gqa=True)
            x = x + F.linear(att.transpose(1, 2).reshape(1, t, -1), w[p + "self_attn.o_proj.weight"])
            h = self._norm(x, w[p + "post_attention_layernorm.weight"])
            gate, up = F.linear(h, w[p + "mlp.gate_proj.weight"]), F.linear(h, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])
        return F.linear(self._norm(x[:, -1], w["model.norm.weight"]), self.head)[0]


def _rope(x, cos, sin):
    """Rotate-half RoPE: x [1, H, T, hd], cos/sin [T, hd]."""
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def measure(ckpt_dir: Path, dtype: str, proto: Protocol) -> dict:
    import torch

    torch.set_num_threads(proto.threads)
    m = TorchQwen2(ckpt_dir, dtype, proto.context)
    ids = prompt_ids(proto.prompt_tokens, m.cfg.vocab_size).tolist()

    def prefill(_):
        with torch.inference_mode():
            return m.forward(ids, 0)

    def decode(logits):
        with torch.inference_mode():
            for step in range(proto.decode_tokens - 1):
                logits = m.forward([int(torch.argmax(logits))], len(ids) + step)

    result = run_repeats(proto, prefill, decode, f"torch {dtype}")
    c = m.cfg
    result["kv_bytes_per_position"] = kv_bytes_per_position(c.num_hidden_layers, c.num_key_value_heads,
                                                            c.head_dim, m.k.element_size())
    result["weight_bytes_per_token"] = m.weight_bytes_per_token
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
