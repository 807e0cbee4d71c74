"""Audio graph (export/audio.py) and AudioEncoder (runtime/audio.py) against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from minicpmo.export.audio import OUTPUT, build_audio_graph  # noqa: E402
from minicpmo.export.graph import GraphBuilder  # noqa: E402
from minicpmo.export.hf_config import ConfigError, parse_config  # noqa: E402
from minicpmo.export.reference.audio import audio_embeddings, clip_embeddings  # noqa: E402
from minicpmo.runtime.audio import AudioEncoder  # noqa: E402
from minicpmo.runtime.preprocess.audio import log_mel_features, piece_token_count  # noqa: E402

SR = 16_000


def tiny_config(**audio):
    return parse_config({
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1000, "query_num": 64, "patch_size": 14,
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "patch_size": 14, "image_size": 980},
        "audio_config": {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4,
                         "encoder_ffn_dim": 256, "num_mel_bins": 80, "max_source_positions": 1500, **audio},
        "audio_pool_step": 2, "audio_chunk_length": 1.0, "chunk_input": True,
    })


def tiny_audio_weights(cfg, seed: int = 0) -> dict:
    """Random float32 audio weights with the upstream names (apm.*, audio_projection_layer.*)."""
    g = torch.Generator().manual_seed(seed)
    w: dict = {}
    a, d_llm = cfg.audio, cfg.decoder.hidden_size

    def rand(name, *shape, std=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        w[name] = torch.randn(*shape, generator=g) * (std if std is not None else fan_in ** -0.5)

    def norm(name, n):
        w[f"{name}.weight"] = 1 + 0.1 * torch.randn(n, generator=g)
        w[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)

    d = a.d_model
    rand("apm.conv1.weight", d, a.num_mel_bins, 3)
    rand("apm.conv1.bias", d, std=0.1)
    rand("apm.conv2.weight", d, d, 3)
    rand("apm.conv2.bias", d, std=0.1)
    rand("apm.embed_positions.weight", a.max_source_positions, d, std=0.5)
    for i in range(a.encoder_layers):
        p = f"apm.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rand(f"{p}.self_attn.{name}.weight", d, d)
            if name != "k_proj":  # Whisper's k_proj has no bias
                rand(f"{p}.self_attn.{name}.bias", d, std=0.1)
        norm(f"{p}.self_attn_layer_norm", d)
        norm(f"{p}.final_layer_norm", d)
        rand(f"{p}.fc1.weight", a.encoder_ffn_dim, d)
        rand(f"{p}.fc1.bias", a.encoder_ffn_dim, std=0.1)
        rand(f"{p}.fc2.weight", d, a.encoder_ffn_dim)
        rand(f"{p}.fc2.bias", d, std=0.1)
    norm("apm.layer_norm", d)
    rand("audio_projection_layer.linear1.weight", d_llm, a.encoder_ffn_dim // 4)
    rand("audio_projection_layer.linear1.bias", d_llm, std=0.1)
    rand("audio_projection_layer.linear2.weight", d_llm, d_llm)
    rand("audio_projection_layer.linear2.bias", d_llm, std=0.1)
    return w


def build_session(cfg, weights, precision, folder, used: set | None = None) -> ort.InferenceSession:
    def read(key: str) -> np.ndarray:
        if used is not None:
            used.add(key)
        return weights[key].numpy()

    g = GraphBuilder("audio")
    build_audio_graph(g, cfg, read, precision)
    path = g.save(folder / f"audio-{precision}.onnx")
    onnx.checker.check_model(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    tone = 0.3 * np.sin(2 * np.pi * (220 + 80 * np.sin(2 * np.pi * 0.7 * t)) * t)
    return (tone * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def weights(cfg):
    return tiny_audio_weights(cfg)


@pytest.fixture(scope="module")
def fp32_session(cfg, weights, tmp_path_factory):
    used: set = set()
    session = build_session(cfg, weights, "fp32", tmp_path_factory.mktemp("audio"), used)
    assert used == set(weights), "every audio weight is read, and nothing else"
    return session


def test_graph_io(fp32_session):
    ins = {i.name: i for i in fp32_session.get_inputs()}
    assert ins["input_features"].shape == ["batch", 80, "n_frames"]
    assert ins["input_features"].type == "tensor(float)"
    assert ins["feature_lens"].shape == ["batch"] and ins["feature_lens"].type == "tensor(int64)"
    (out,) = fp32_session.get_outputs()
    assert out.name == OUTPUT and out.shape == ["batch", "n_tokens", 256]


@pytest.mark.parametrize("seconds", [1.0, 2.3, 30.0])
def test_graph_matches_reference(fp32_session, cfg, weights, seconds):
    feats = log_mel_features(speech(seconds, seed=int(seconds * 10)))  # [80, F]
    frames = feats.shape[1]
    out = fp32_session.run([OUTPUT], {"input_features": feats[None], "feature_lens": np.array([frames])})[0]
    tokens = piece_token_count(frames)
    with torch.no_grad():
        ref = audio_embeddings(weights, cfg, [torch.from_numpy(feats)])[0].numpy()
    assert ref.shape == (tokens, 256)
    assert out.shape[1] >= tokens
    np.testing.assert_allclose(out[0, :tokens], ref, rtol=0, atol=1e-4)


def test_encoder_reproduces_upstream_batch(fp32_session, cfg, weights):
    """Clips of 2.3 s and 31 s: upstream pads all three pieces to 3000 frames in one batch."""
    clips = [speech(2.3, seed=1), speech(31.0, seed=2)]
    enc = AudioEncoder(fp32_session, chunk_frames=50)
    got = enc.encode_batch(clips)
    with torch.no_grad():
        ref = [r.numpy() for r in clip_embeddings(weights, cfg, clips)]
    assert [g.shape for g in got] == [r.shape for r in ref] == [(57, 256), (775, 256)]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4)
    # The padding reaches only the last, partial 1 s chunk (25 tokens each) of the 2.3 s clip:
    alone = enc.encode(clips[0])
    np.testing.assert_allclose(alone[:50], got[0][:50], rtol=0, atol=1e-5)
    assert np.abs(alone[50:] - got[0][50:]).max() > 1e-3


def test_encode_single_clip_matches_reference(fp32_session, cfg, weights):
    clip = speech(1.37, seed=3)
    with torch.no_grad():
        ref = clip_embeddings(weights, cfg, [clip])[0].numpy()
    np.testing.assert_allclose(AudioEncoder(fp32_session).encode(clip), ref, rtol=0, atol=1e-4)


def test_tiny_clip_has_no_tokens(fp32_session):
    out = AudioEncoder(fp32_session).encode(np.zeros(320, np.float32))
    assert out.shape == (0, 256)


@pytest.mark.parametrize("precision,tol", [("fp16", 2e-2), ("int8", 5e-2)])
def test_reduced_precision_close(cfg, weights, fp32_session, tmp_path, precision, tol):
    session = build_session(cfg, weights, precision, tmp_path)
    clip = speech(2.3, seed=4)
    ref = AudioEncoder(fp32_session).encode(clip)
    got = AudioEncoder(session).encode(clip)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < tol, rel


def test_config_checks(weights):
    with pytest.raises(ConfigError, match="activation_function"):
        build_audio_graph(GraphBuilder("a"), tiny_config(activation_function="relu"),
                          lambda k: weights[k].numpy(), "fp32")
