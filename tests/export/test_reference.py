"""The independent PyTorch reference: slicing, prompt layout, position tables, masking, causality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from minicpmo.export.hf_config import parse_config  # noqa: E402
from minicpmo.export.reference import decoder as dec  # noqa: E402
from minicpmo.export.reference import preprocess as pp  # noqa: E402
from minicpmo.export.reference.pipeline import reference_chat, splice  # noqa: E402
from minicpmo.export.reference.prompt import build_prompt  # noqa: E402
from minicpmo.export.reference.resampler import get_2d_sincos_pos_embed, resampler_forward  # noqa: E402
from minicpmo.export.reference.vision import navit_position_ids, siglip_forward  # noqa: E402
from minicpmo.export.reference.weights import load_weights  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "tokenizer"
HAVE_TOKENIZER = (TOKENIZER / "tokenizer.json").is_file()


def tiny_config(vocab: int = 1000):
    return parse_config({
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": False, "query_num": 64, "patch_size": 14,
        "slice_config": {"max_slice_nums": 9}, "vision_batch_size": 16,
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "patch_size": 14, "image_size": 980},
    })


def tiny_weights(cfg, seed: int = 0) -> dict:
    """Random float32 weights with the upstream names at the config's sizes."""
    g = torch.Generator().manual_seed(seed)
    w: dict = {}

    def rand(name, *shape, std=None):
        std = std if std is not None else shape[-1] ** -0.5
        w[name] = torch.randn(*shape, generator=g) * std

    def norm(name, n, bias=True):
        w[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        if bias:
            w[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)

    d, v, hd = cfg.decoder, cfg.vision, cfg.decoder.head_dim
    kv = d.num_key_value_heads * hd
    rand("llm.model.embed_tokens.weight", d.vocab_size, d.hidden_size, std=1.0)
    rand("llm.lm_head.weight", d.vocab_size, d.hidden_size)
    norm("llm.model.norm", d.hidden_size, bias=False)
    for i in range(d.num_hidden_layers):
        p = f"llm.model.layers.{i}"
        for name, out in (("q_proj", d.hidden_size), ("k_proj", kv), ("v_proj", kv)):
            rand(f"{p}.self_attn.{name}.weight", out, d.hidden_size)
            rand(f"{p}.self_attn.{name}.bias", out, std=0.1)
        rand(f"{p}.self_attn.o_proj.weight", d.hidden_size, d.hidden_size)
        rand(f"{p}.mlp.gate_proj.weight", d.intermediate_size, d.hidden_size)
        rand(f"{p}.mlp.up_proj.weight", d.intermediate_size, d.hidden_size)
        rand(f"{p}.mlp.down_proj.weight", d.hidden_size, d.intermediate_size)
        norm(f"{p}.input_layernorm", d.hidden_size, bias=False)
        norm(f"{p}.post_attention_layernorm", d.hidden_size, bias=False)
    rand("vpm.embeddings.patch_embedding.weight", v.hidden_size, 3, v.patch_size, v.patch_size,
         std=(3 * v.patch_size**2) ** -0.5)
    rand("vpm.embeddings.patch_embedding.bias", v.hidden_size, std=0.1)
    rand("vpm.embeddings.position_embedding.weight", v.num_patches_per_side**2, v.hidden_size, std=1.0)
    for i in range(v.num_hidden_layers):
        p = f"vpm.encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rand(f"{p}.self_attn.{name}.weight", v.hidden_size, v.hidden_size)
            rand(f"{p}.self_attn.{name}.bias", v.hidden_size, std=0.1)
        rand(f"{p}.mlp.fc1.weight", v.intermediate_size, v.hidden_size)
        rand(f"{p}.mlp.fc1.bias", v.intermediate_size, std=0.1)
        rand(f"{p}.mlp.fc2.weight", v.hidden_size, v.intermediate_size)
        rand(f"{p}.mlp.fc2.bias", v.hidden_size, std=0.1)
        norm(f"{p}.layer_norm1", v.hidden_size)
        norm(f"{p}.layer_norm2", v.hidden_size)
    norm("vpm.post_layernorm", v.hidden_size)
    D = d.hidden_size
    rand("resampler.query", cfg.slicing.query_num, D, std=1.0)
    rand("resampler.kv_proj.weight", D, v.hidden_size)
    rand("resampler.attn.in_proj_weight", 3 * D, D)
    rand("resampler.attn.in_proj_bias", 3 * D, std=0.1)
    rand("resampler.attn.out_proj.weight", D, D)
    rand("resampler.attn.out_proj.bias", D, std=0.1)
    for name in ("ln_q", "ln_kv", "ln_post"):
        norm(f"resampler.{name}", D)
    rand("resampler.proj", D, D)
    return w


@pytest.fixture(scope="module")
def small():
    cfg = tiny_config()
    return cfg, tiny_weights(cfg)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- slicing (ARCH §3 examples) --

@pytest.mark.parametrize("size, source_tgt, grid, tile_tgt", [
    ((1000, 400), (20, 50), (3, 1), (35, 29)),
    ((300, 900), (55, 18), (1, 3), (32, 32)),
    ((1344, 896), (26, 39), (3, 2), (32, 32)),
    ((448, 448), (32, 32), None, None),
    ((200, 150), (28, 37), None, None),
])
def test_slicing_examples(size, source_tgt, grid, tile_tgt):
    out = pp.preprocess_image(noise_image(*size), tiny_config())
    assert out.grid == grid
    assert out.tgt_sizes[0] == source_tgt
    n_tiles = grid[0] * grid[1] if grid else 0
    assert out.tgt_sizes[1:] == [tile_tgt] * n_tiles
    for strip, (h, w) in zip(out.strips, out.tgt_sizes, strict=True):
        assert strip.shape == (3, 14, h * w * 14) and strip.dtype == torch.float32


def test_example_pixel_sizes():
    assert pp.find_best_resize((1000, 400), 448, 14) == (700, 280)
    assert pp.get_refine_size((1000, 400), (3, 1), 448, 14, allow_upscale=True) == (3 * 406, 490)
    assert pp.find_best_resize((200, 150), 448, 14, allow_upscale=True) == (518, 392)


def test_bankers_rounding():
    assert pp.ensure_divide(707, 14) == 700  # 50.5 -> 50
    assert pp.ensure_divide(721, 14) == 728  # 51.5 -> 52
    assert pp.ensure_divide(3, 14) == 14  # never below one patch


def test_grid_tie_breaking_and_cap():
    # square image, 1 < area/448² <= 2: [1,2] and [2,1] tie on |log ratio|; the first candidate wins
    assert pp.get_sliced_grid((560, 560), 9, 448) == (1, 2)
    assert pp.get_sliced_grid((448, 448), 9, 448) is None
    assert pp.get_sliced_grid((4000, 4000), 9, 448) == (3, 3)  # candidates 8, 9 (10 is over the cap)


def test_reshape_by_patch_raster_order():
    img = torch.arange(3 * 28 * 42, dtype=torch.float32).reshape(3, 28, 42)
    strip = pp.reshape_by_patch(img, 14)
    assert strip.shape == (3, 14, 6 * 14)
    for j in range(6):
        r, c = divmod(j, 3)
        assert torch.equal(strip[:, :, j * 14:(j + 1) * 14], img[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14])


def test_normalisation():
    x = pp.to_normalized_chw(Image.new("RGB", (2, 1), (0, 255, 51)))
    assert x.shape == (3, 1, 2)
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_placeholder_layout():
    cfg = tiny_config()
    unk = "<unk>" * 64
    assert pp.image_placeholder(0, None, cfg) == f"<image_id>0</image_id><image>{unk}</image>"
    text = pp.image_placeholder(3, (2, 2), cfg)
    row = f"<slice>{unk}</slice>" * 2
    assert text == f"<image_id>3</image_id><image>{unk}</image>{row}\n{row}"


# -- prompt (ARCH §6 example) --

@pytest.mark.skipif(not HAVE_TOKENIZER, reason="real tokenizer not available")
def test_prompt_example_layout():
    msgs = [{"role": "user", "content": [noise_image(300, 900), "What is in the image?"]}]
    prompt = build_prompt(TOKENIZER, msgs, tiny_config())
    assert prompt.image_bounds == [(28, 92), (94, 158), (161, 225), (228, 292)]
    ids = prompt.ids
    assert ids[:3] == [151644, 8948, 198] and ids[19:24] == [151645, 198, 151644, 872, 198]
    assert ids[24:28] == [151677, 15, 151678, 151665]
    assert ids[28:92] == [128244] * 64 and ids[92:94] == [151666, 151675]
    assert ids[158:161] == [151676, 198, 151675] and ids[225:228] == [151676, 198, 151675]
    assert ids[292:294] == [151676, 198]
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]
    assert prompt.text.endswith("What is in the image?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.skipif(not HAVE_TOKENIZER, reason="real tokenizer not available")
def test_prompt_image_ids_count_over_conversation():
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [noise_image(64, 64), "a"]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": ["b", noise_image(80, 60, seed=1)]}]
    prompt = build_prompt(TOKENIZER, msgs, tiny_config())
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert "<image_id>0</image_id>" in prompt.text and "b\n<image_id>1</image_id>" in prompt.text
    assert len(prompt.image_bounds) == 2 and all(e - s == 64 for s, e in prompt.image_bounds)


# -- position tables --

def test_sincos_table_matches_formula():
    D, H, W = 32, 5, 7
    table = get_2d_sincos_pos_embed(D, (H, W))
    assert table.shape == (H, W, D) and table.dtype == np.float32
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    for y, x in [(0, 0), (2, 6), (4, 1)]:
        expect = np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)])
        np.testing.assert_allclose(table[y, x], expect, atol=1e-6)


def test_navit_position_ids_follow_upstream_float32_buckets():
    def ids(h, w):
        mask = torch.ones(1, 1, h * w, dtype=torch.bool)
        return navit_position_ids(mask, torch.tensor([[h, w]], dtype=torch.int32), 70)[0]

    assert torch.equal(ids(70, 70), torch.arange(4900))
    assert ids(32, 32)[:7].tolist() == [0, 2, 4, 6, 8, 10, 13]
    # upstream's float32 step lands 5/25 just under the 14/70 boundary: bucket 13, not floor(14) = 14
    assert ids(25, 1)[5].item() == 13 * 70
    padded = navit_position_ids(torch.tensor([[[True] * 4 + [False] * 2]]), torch.tensor([[2, 2]]), 70)
    assert padded[0].tolist() == [0, 35, 35 * 70, 35 * 70 + 35, 0, 0]


# -- vision / resampler masking --

def test_vision_padded_batch_equals_single(small):
    cfg, w = small
    sizes = [(3, 4), (2, 2), (4, 5)]
    strips = [torch.randn(3, 14, h * wd * 14, generator=torch.Generator().manual_seed(i))
              for i, (h, wd) in enumerate(sizes)]
    batch = siglip_forward(w, cfg, strips, sizes)
    assert batch.shape == (3, 20, 64)
    for i, (h, wd) in enumerate(sizes):
        alone = siglip_forward(w, cfg, [strips[i]], [(h, wd)])
        torch.testing.assert_close(batch[i, : h * wd], alone[0], atol=2e-5, rtol=1e-5)
    chunked = siglip_forward(w, cfg, strips, sizes, batch_size=2)
    torch.testing.assert_close(chunked, batch, atol=2e-5, rtol=1e-5)


def test_resampler_ignores_padding(small):
    cfg, w = small
    sizes = [(3, 4), (2, 2)]
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5))
    both = resampler_forward(w, cfg, x, sizes)
    assert both.shape == (2, 64, 256)
    x2 = x.clone()
    x2[1, 4:] = 1e3  # garbage in the padded rows must not matter
    torch.testing.assert_close(resampler_forward(w, cfg, x2, sizes), both)
    alone = resampler_forward(w, cfg, x[1:, :4], sizes[1:])
    torch.testing.assert_close(both[1:], alone, atol=2e-5, rtol=1e-5)


# -- decoder --

def test_rope_is_a_relative_rotation():
    hd = 16
    cos, sin = dec.rope_cos_sin(torch.arange(12), hd, 1e6)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    rq = dec.apply_rope(q.expand(1, 1, 12, hd), cos, sin)
    rk = dec.apply_rope(k.expand(1, 1, 12, hd), cos, sin)
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0])  # position 0 is the identity
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 12))
    dot = (rq[0, 0, 7] * rk[0, 0, 3]).sum(), (rq[0, 0, 9] * rk[0, 0, 5]).sum()
    torch.testing.assert_close(dot[0], dot[1], atol=1e-5, rtol=1e-5)


def test_decoder_is_causal(small):
    cfg, w = small
    ids = [5, 17, 3, 99, 42, 7]
    a = dec.decoder_forward(w, cfg, dec.embed(w, ids))
    b = dec.decoder_forward(w, cfg, dec.embed(w, ids[:4] + [500, 600]))
    assert a.shape == (1, 6, cfg.decoder.vocab_size)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_cached_greedy_matches_full_recompute(small):
    cfg, w = small
    embeds = dec.embed(w, [1, 2, 3, 4])
    out = dec.greedy_generate(w, cfg, embeds, max_new_tokens=5)
    seq, expect = embeds, []
    for _ in range(5):
        token = int(dec.decoder_forward(w, cfg, seq)[0, -1].argmax())
        expect.append(token)
        seq = torch.cat([seq, dec.embed(w, [token])], dim=1)
    assert out == expect
    stop = dec.greedy_generate(w, cfg, embeds, max_new_tokens=5, stop_ids=[expect[1]])
    assert stop == expect[: expect.index(expect[1]) + 1]


def test_tied_lm_head(small):
    cfg, w = small
    raw = dict(cfg.raw, tie_word_embeddings=True)
    tied = parse_config(raw)
    w2 = {k: v for k, v in w.items() if k != "llm.lm_head.weight"}
    logits = dec.decoder_forward(w2, tied, dec.embed(w2, [1, 2]))
    hidden = dec.decoder_hidden(w2, tied, dec.embed(w2, [1, 2]))
    torch.testing.assert_close(logits, hidden @ w2["llm.model.embed_tokens.weight"].T)


def test_splice_checks_counts():
    text = torch.zeros(1, 6, 2)
    out = splice(text, torch.ones(1, 2, 2), [(1, 3)])
    assert out[0, :, 0].tolist() == [0, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="placeholder positions"):
        splice(text, torch.ones(1, 3, 2), [(1, 3)])


def test_load_weights_converts_bf16(tmp_path):
    from safetensors.torch import save_file

    save_file({"llm.a": torch.ones(2, dtype=torch.bfloat16), "tts.b": torch.ones(1)}, str(tmp_path / "m.safetensors"))
    w = load_weights(tmp_path)
    assert list(w) == ["llm.a"] and w["llm.a"].dtype == torch.float32
    assert set(load_weights(tmp_path, prefixes=None)) == {"llm.a", "tts.b"}


@pytest.mark.skipif(not HAVE_TOKENIZER, reason="real tokenizer not available")
def test_reference_chat_end_to_end():
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json")).get_vocab_size()
    cfg = tiny_config(vocab)
    w = tiny_weights(cfg, seed=1)
    msgs = [{"role": "user", "content": [noise_image(300, 900), "What is in the image?"]}]
    out = reference_chat(w, cfg, TOKENIZER, msgs, max_new_tokens=3)
    assert out["image_bounds"] == [(28, 92), (94, 158), (161, 225), (228, 292)]
    assert len(out["prompt_ids"]) == 305 and 1 <= len(out["output_ids"]) <= 3
    assert all(0 <= t < vocab for t in out["output_ids"])
