"""The exported graphs against the independent PyTorch reference (export/reference), on a tiny
synthetic checkpoint: vision embeddings and logits within 1e-4 in fp32, greedy ids identical,
and int4/int8 logits close to fp32 (cosine >= 0.99)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from minicpmo.export.hf_config import load_config  # noqa: E402
from minicpmo.export.reference import load_weights, reference_chat, reference_image_embeds  # noqa: E402
from minicpmo.export.reference.pipeline import reference_prefill_logits  # noqa: E402
from minicpmo.runtime.pipeline import Pipeline  # noqa: E402
from minicpmo.runtime.types import GenerationParams  # noqa: E402
from synthetic_media import make_image  # noqa: E402

# (width, height): aspect ratios that give different slice grids (see ARCH §3)
SIZES = {
    "square": (640, 640), "4:3 small": (200, 150), "5:2": (1000, 400), "1:3": (300, 900),
    "3:2 large": (1344, 896), "10:1": (1400, 140), "20x20": (20, 20),
}


def to_reference_messages(messages):
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [p["image"] if p["type"] == "image" else p["text"] for p in content]
        out.append({"role": m["role"], "content": content})
    return out


@pytest.fixture(scope="module")
def weights(tiny_checkpoint):
    return load_weights(tiny_checkpoint, prefixes=None)


@pytest.fixture(scope="module")
def cfg(tiny_checkpoint):
    return load_config(tiny_checkpoint)


@pytest.fixture(scope="module")
def fp32_pipe(fp32_bundle):
    return Pipeline.load(fp32_bundle, provider="cpu", context_length=4096)


@pytest.mark.parametrize("name", list(SIZES))
def test_vision_embeddings_match_reference(name, weights, cfg, fp32_pipe):
    img = make_image(*SIZES[name], seed=len(name))
    prepared = fp32_pipe.vision.prepare(img)
    ours = fp32_pipe.vision.encode(prepared)
    ref = reference_image_embeds(weights, cfg, [img]).numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _user(images, text):
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images]
            + [{"type": "text", "text": text}]}


def _conversations():
    imgs = {name: make_image(*size, seed=i) for i, (name, size) in enumerate(SIZES.items())}
    cases = {f"image {name}": [_user([im], "What is in the image?")] for name, im in imgs.items()}
    cases["text only"] = [{"role": "user", "content": "Tell me a story about a robot."}]
    cases["two images"] = [_user([imgs["square"], imgs["1:3"]], "Compare these two pictures.")]
    cases["earlier turn"] = [
        _user([imgs["5:2"]], "Describe this."),
        {"role": "assistant", "content": "A wide picture with stripes."},
        {"role": "user", "content": "What colour is it mostly?"},
    ]
    return cases


CONVERSATIONS = _conversations()


@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_greedy_tokens_identical_to_reference(case, weights, cfg, tiny_checkpoint, fp32_pipe):
    messages = CONVERSATIONS[case]
    ref = reference_chat(weights, cfg, tiny_checkpoint, to_reference_messages(messages), max_new_tokens=32)
    fp32_pipe.kv.reset()  # the first request of a conversation: no cached prefix
    chunks = list(fp32_pipe.generate(messages, GenerationParams(max_tokens=32)))
    ours = [t for c in chunks for t in c.token_ids]
    assert fp32_pipe.last_prompt_ids == list(ref["prompt_ids"])
    assert ours == list(ref["output_ids"])


def test_prefill_logits_match_reference(weights, cfg, tiny_checkpoint, fp32_pipe):
    messages = CONVERSATIONS["image 3:2 large"]
    _, ref_logits = reference_prefill_logits(weights, cfg, tiny_checkpoint, to_reference_messages(messages))
    fp32_pipe.kv.reset()
    np.testing.assert_allclose(fp32_pipe.prompt_logits(messages)[0], ref_logits[0, -1].numpy(), atol=1e-4, rtol=0)


def test_cached_prefix_gives_the_same_tokens(fp32_pipe):
    """A follow-up turn re-uses the KV cache of the earlier turns and still matches a cold run."""
    first = CONVERSATIONS["earlier turn"][:1]
    fp32_pipe.kv.reset()
    reply = "".join(c.text for c in fp32_pipe.generate(first, GenerationParams(max_tokens=8)))
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    warm = list(fp32_pipe.generate(follow, GenerationParams(max_tokens=16)))
    assert warm[-1].usage.cached_prompt_tokens > 64
    fp32_pipe.kv.reset()
    cold = list(fp32_pipe.generate(follow, GenerationParams(max_tokens=16)))
    assert cold[-1].usage.cached_prompt_tokens == 0
    assert [t for c in warm for t in c.token_ids] == [t for c in cold for t in c.token_ids]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("bundle_fixture", ["int4_bundle", "int8_bundle", "int4_fp16_bundle", "int4_kv8_bundle"])
@pytest.mark.parametrize("case", ["text only", "image 5:2", "two images"])
def test_quantized_logits_close_to_fp32(bundle_fixture, case, request, fp32_pipe):
    pipe = Pipeline.load(request.getfixturevalue(bundle_fixture), provider="cpu", context_length=4096)
    messages = CONVERSATIONS[case]
    fp32_pipe.kv.reset()
    assert _cosine(pipe.prompt_logits(messages)[0], fp32_pipe.prompt_logits(messages)[0]) >= 0.99


def test_fp16_decoder_variant(int4_fp16_bundle, int4_bundle):
    """The GPU variant: an fp16 KV cache (half the bytes), and fp16 scales that add no visible error."""
    import json

    fp16 = Pipeline.load(int4_fp16_bundle, provider="cpu", context_length=256)
    fp32 = Pipeline.load(int4_bundle, provider="cpu", context_length=256)
    assert fp16.kv.dtype == np.float16 and 2 * fp16.kv.nbytes == fp32.kv.nbytes
    manifests = [json.loads((b / "manifest.json").read_text()) for b in (int4_fp16_bundle, int4_bundle)]
    # the GPU variant keeps a plain int8 head; the CPU default scans with int4 and rescores with int8
    assert [m["options"]["lm_head_precision"] for m in manifests] == ["int8", "int4+int8"]
    errors = [m["quantization"]["per_tensor"] for m in manifests]
    assert errors[0]["/lm_head"] < 0.01 and abs(errors[0]["/lm_head"] - errors[1]["/lm_head/rescore"]) < 1e-3
    layers = [k for k in errors[1] if k.startswith("/model/layers.")]
    assert layers and set(layers) < errors[0].keys()
    assert max(abs(errors[0][k] - errors[1][k]) for k in layers) < 1e-3


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_cheaper_encoder_precision_keeps_cosine(precision, tmp_path_factory, tiny_checkpoint, fp32_pipe):
    """Vision (and audio) at fp16 / dynamic int8 stay within cosine 0.995 of fp32, per slice / token."""
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions
    from synthetic_media import tone

    out = tmp_path_factory.mktemp("bundles") / f"vision-{precision}"
    export_bundle(tiny_checkpoint, out, ExportOptions(vision_precision=precision), progress=lambda *a: None)
    pipe = Pipeline.load(out, provider="cpu")
    for name in ("square", "10:1"):
        img = make_image(*SIZES[name], seed=3)
        ours = pipe.vision.encode(pipe.vision.prepare(img)).reshape(-1, 64 * fp32_pipe.embed.hidden_size)
        ref = fp32_pipe.vision.encode(fp32_pipe.vision.prepare(img)).reshape(ours.shape)
        cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.995, (name, cos)
    clip = tone(2.0)
    a, b = pipe.audio.encode(clip), fp32_pipe.audio.encode(clip)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99


def test_repeated_image_costs_no_vision_encode(fp32_pipe):
    messages = CONVERSATIONS["image 3:2 large"]
    fp32_pipe.vision.cache.clear()
    calls = []
    run = fp32_pipe.vision.session.run
    fp32_pipe.vision.session.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    try:
        first = [t for c in fp32_pipe.generate(messages, GenerationParams(max_tokens=4)) for t in c.token_ids]
        n_first = len(calls)
        fp32_pipe.kv.reset()  # no KV reuse either: the prompt is prefilled again from cached embeddings
        again = [t for c in fp32_pipe.generate(messages, GenerationParams(max_tokens=4)) for t in c.token_ids]
    finally:
        del fp32_pipe.vision.session.run
    assert n_first >= 1 and len(calls) == n_first
    assert again == first and fp32_pipe.vision.cache.hits >= 1
