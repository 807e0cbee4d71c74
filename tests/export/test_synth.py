"""Synthetic checkpoints: upstream layout, determinism, readability, the full-size plan, the tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from minicpmo.export.checkpoint import INDEX_FILE, CheckpointError, expected_tensors, open_checkpoint
from minicpmo.export.hf_config import load_config
from minicpmo.export.synth import (
    LOGIT_STD,
    _plan_shards,
    planned_tensors,
    random_bf16,
    to_bf16_bits,
    write_synthetic_checkpoint,
)
from minicpmo.export.synth_tokenizer import build_tokenizer, upstream_tokenizer_metadata

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"
WEIGHT_SHAPES = SHARED / "weight_shapes.txt"
REAL_TOKENIZER = SHARED / "tokenizer"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synth") / "tiny", size="tiny", seed=0)


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_has_upstream_layout(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.json", "merges.txt"} <= names
    ckpt = open_checkpoint(tiny)
    ckpt.validate()
    plan = planned_tensors("tiny")
    assert ckpt.keys() == [n for n, _ in plan]
    assert all(ckpt.shape(n) == s and ckpt.dtype(n) == "BF16" for n, s in plan)
    assert any(k.startswith("tts.") for k in ckpt.keys())
    assert set(expected_tensors(ckpt.config)) == {k for k in ckpt.keys() if not k.startswith("tts.")}


def test_tiny_config_dims_and_token_ids(tiny):
    cfg = load_config(tiny)
    d, v, a = cfg.decoder, cfg.vision, cfg.audio
    assert (d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads,
            d.intermediate_size) == (256, 2, 4, 2, 512)
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (64, 2, 4, 128)
    assert (v.patch_size, v.image_size, v.num_patches_per_side) == (14, 980, 70)
    assert (a.d_model, a.encoder_layers, a.encoder_attention_heads, a.encoder_ffn_dim, a.num_mel_bins,
            a.max_source_positions) == (64, 2, 4, 256, 80, 1500)
    assert a.encoder_ffn_dim // 4 == a.d_model and cfg.slicing.query_num == 64 and d.hidden_size % 128 == 0
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert d.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert d.bos_token_id == tok.token_to_id("<|endoftext|>") and d.eos_token_id == tok.token_to_id("<|im_end|>")
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (d.bos_token_id, d.eos_token_id)
    if (SHARED / "config.json").is_file():
        real = json.loads((SHARED / "config.json").read_text())
        assert list(cfg.raw) == list(real)
        assert json.loads((tiny / "preprocessor_config.json").read_text()) == \
            json.loads((SHARED / "preprocessor_config.json").read_text())


def test_values_are_scaled_for_a_sane_forward_pass(tiny):
    ckpt = open_checkpoint(tiny)
    norm = ckpt.read("llm.model.layers.0.input_layernorm.weight")
    assert abs(norm.mean() - 1) < 0.02 and 0.02 < norm.std() < 0.1
    assert np.abs(ckpt.read("vpm.encoder.layers.0.mlp.fc1.bias")).max() < 0.2
    up = ckpt.read("llm.model.layers.0.mlp.up_proj.weight")  # [512, 256]
    assert up.std() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    head = ckpt.read("llm.lm_head.weight")
    assert head.std() == pytest.approx(LOGIT_STD / math.sqrt(256), rel=0.05)
    assert all(np.isfinite(ckpt.read(k)).all() for k in ckpt.keys())


def test_readable_by_the_safetensors_library(tiny):
    plan = dict(planned_tensors("tiny"))
    with safe_open(str(tiny / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(plan)
        assert f.metadata() == {"format": "pt"}
        for name in f.keys():
            sl = f.get_slice(name)
            assert tuple(sl.get_shape()) == plan[name] and sl.get_dtype() == "BF16"


def test_values_equal_torch_reading(tiny):
    torch = pytest.importorskip("torch")
    ckpt = open_checkpoint(tiny)
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        for name in ("llm.model.embed_tokens.weight", "vpm.embeddings.patch_embedding.weight", "resampler.proj"):
            assert np.array_equal(f.get_tensor(name).to(torch.float32).numpy(), ckpt.read(name))


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    again = write_synthetic_checkpoint(tmp_path / "again", size="tiny", seed=0)
    assert _file_bytes(again) == _file_bytes(tiny)
    other = write_synthetic_checkpoint(tmp_path / "other", size="tiny", seed=1)
    a, b = _file_bytes(tiny), _file_bytes(other)
    weights = ("model.safetensors", "assets/Vocos.pt")
    assert all(a[w] != b[w] for w in weights)
    assert {k: v for k, v in a.items() if k not in weights} == {k: v for k, v in b.items() if k not in weights}


def test_no_audio_drops_audio_and_keeps_every_other_tensor_identical(tiny, tmp_path):
    out = write_synthetic_checkpoint(tmp_path / "noaudio", size="tiny", seed=0, audio=False)
    ckpt, full = open_checkpoint(out), open_checkpoint(tiny)
    assert not any(k.startswith(("apm.", "audio_projection_layer.")) for k in ckpt.keys())
    assert any(k.startswith("tts.") for k in ckpt.keys())
    ckpt.validate(parts=("vision", "resampler", "decoder"))
    for name in ("llm.model.norm.weight", "vpm.post_layernorm.bias", "tts.dvae.coef"):
        assert np.array_equal(ckpt.read(name), full.read(name))  # per-tensor seeds: order does not matter


def test_sharded_write_and_progress(tiny, tmp_path):
    calls = []
    out = write_synthetic_checkpoint(tmp_path / "sharded", size="tiny", seed=0, max_shard_bytes=1_000_000,
                                     progress=lambda done, total, msg: calls.append((done, total, msg)))
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    total = sum(2 * math.prod(s) for _, s in planned_tensors("tiny"))
    assert index["metadata"]["total_size"] == total
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and calls[-1][:2] == (total, total)
    ckpt, single = open_checkpoint(out), open_checkpoint(tiny)
    ckpt.validate()
    assert sorted(ckpt.keys()) == sorted(single.keys())
    assert np.array_equal(ckpt.read("llm.lm_head.weight"), single.read("llm.lm_head.weight"))


def test_bf16_rounds_to_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 1 + 2**-8 + 2**-20, 0.0], dtype=np.float32)
    assert to_bf16_bits(x.copy()).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x3F81, 0]


def test_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 10
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bf16_bits(x.copy()), ref)


def test_random_chunks_cover_the_tensor():
    chunks = list(random_bf16("x.weight", (3, 5), seed=0))
    assert sum(c.size for c in chunks) == 15 and all(c.dtype == np.dtype("<u2") for c in chunks)


def test_full_plan_is_exactly_the_real_weight_list():
    if not WEIGHT_SHAPES.is_file():
        pytest.skip("shared reference data absent")
    real = []
    for line in WEIGHT_SHAPES.read_text().splitlines():
        name, shape = line.split("\t")
        real.append((name, tuple(json.loads(shape))))
    plan = planned_tensors("full")
    assert plan == real
    assert sum(math.prod(s) for _, s in plan) == 8_674_997_028
    shards = _plan_shards(plan, 5_000_000_000)
    assert [f for f, _ in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]


def test_small_plan_shapes():
    plan = dict(planned_tensors("small"))
    assert plan["llm.model.layers.27.mlp.up_proj.weight"] == (8960, 1536)
    assert plan["llm.model.layers.0.self_attn.k_proj.weight"] == (256, 1536)
    assert plan["vpm.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert plan["resampler.kv_proj.weight"] == (1536, 1152)
    assert plan["apm.layers.23.fc1.weight"] == (4096, 1024)
    assert plan["audio_projection_layer.linear1.weight"] == (1536, 1024)
    assert plan["tts.projector.linear1.weight"] == (768, 1536)
    shards = _plan_shards(list(plan.items()), 2_000_000_000)
    assert len(shards) > 1 and all(sum(2 * math.prod(s) for _, s in g) <= 2_000_000_000 for _, g in shards)


def test_bad_arguments(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        write_synthetic_checkpoint(tmp_path / "full")
    with pytest.raises(ValueError, match="unknown size"):
        write_synthetic_checkpoint(tmp_path / "a", size="huge")
    with pytest.raises(ValueError, match="seed"):
        write_synthetic_checkpoint(tmp_path / "b", seed=-1)
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        write_synthetic_checkpoint(tmp_path / "c", tokenizer_dir=tmp_path)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.partial-*"))


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    out = write_synthetic_checkpoint(tmp_path / "empty", size="tiny")
    assert (out / "model.safetensors").is_file()


def test_tokenizer_dir_is_copied(tmp_path):
    src = REAL_TOKENIZER if (REAL_TOKENIZER / "tokenizer.json").is_file() else None
    if src is None:
        src = tmp_path / "tok"
        build_tokenizer(src)
    out = write_synthetic_checkpoint(tmp_path / "ck", size="tiny", tokenizer_dir=src)
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    cfg = load_config(out)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    assert cfg.decoder.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert cfg.decoder.eos_token_id == tok.token_to_id("<|im_end|>")
    if src == REAL_TOKENIZER:
        assert (cfg.decoder.vocab_size, cfg.decoder.bos_token_id, cfg.decoder.eos_token_id) == (151700, 151643, 151645)


# ---------------------------------------------------------------- synthetic tokenizer

@pytest.fixture(scope="module")
def synth_tok(tmp_path_factory) -> tuple[Path, Tokenizer]:
    folder = tmp_path_factory.mktemp("tok")
    size = build_tokenizer(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert size == tok.get_vocab_size(with_added_tokens=True)
    return folder, tok


@pytest.mark.parametrize("text", ["Hello, world! What is in this image?", "héllo wörld — 世界 🙂\n\tend",
                                  "  two  spaces\r\nand 3.14159 numbers 2024", ""])
def test_synthetic_tokenizer_round_trips_bytes(synth_tok, text):
    _, tok = synth_tok
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_synthetic_tokenizer_added_tokens_match_upstream(synth_tok):
    _, tok = synth_tok
    added = upstream_tokenizer_metadata()["added_tokens"]
    assert len(added) == 58 and added[0] == ["<unk>", True] and ["<tool_call>", False] in added
    decoder = tok.get_added_tokens_decoder()
    by_content = {t.content: t for t in decoder.values()}
    for content, special in added:
        ids = tok.encode(f"a{content}b").ids
        assert tok.token_to_id(content) in ids and len(tok.encode(content).ids) == 1, content
        assert by_content[content].special == special, content
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_synthetic_tokenizer_config_matches_upstream(synth_tok):
    folder, tok = synth_tok
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>")
    for tid, entry in cfg["added_tokens_decoder"].items():
        assert tok.token_to_id(entry["content"]) == int(tid)
    added = json.loads((folder / "added_tokens.json").read_text())
    assert all(tok.token_to_id(c) == i for c, i in added.items())
    if (REAL_TOKENIZER / "tokenizer_config.json").is_file():
        real = json.loads((REAL_TOKENIZER / "tokenizer_config.json").read_text())
        assert cfg["chat_template"] == real["chat_template"]
        assert list(cfg) == list(real)
        assert list(cfg["added_tokens_decoder"].values()) == list(real["added_tokens_decoder"].values())
        assert json.loads((folder / "special_tokens_map.json").read_text()) == \
            json.loads((REAL_TOKENIZER / "special_tokens_map.json").read_text())


def test_synthetic_tokenizer_is_deterministic(synth_tok, tmp_path):
    folder, _ = synth_tok
    build_tokenizer(tmp_path)
    assert _file_bytes(tmp_path) == _file_bytes(folder)


def test_grown_bpe_reaches_the_size_and_repeats():
    from minicpmo.export.synth_tokenizer import grown_bpe, make_tokenizer

    vocab, merges = grown_bpe(3000, seed=1)
    assert len(vocab) == 3000 and (vocab, merges) == grown_bpe(3000, seed=1)
    assert all(a in vocab and b in vocab and a + b in vocab for a, b in merges)
    tok = make_tokenizer(vocab, merges)[0]
    text = "The receipt total is 42.50 EUR."
    assert tok.decode(tok.encode(text).ids) == text
