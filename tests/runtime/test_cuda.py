"""The CUDA provider (onnxruntime-gpu): skipped where this onnxruntime has no CUDAExecutionProvider
(CI has none; run on a GPU machine with the `gpu` extra installed).

The fp16 decoder on the GPU is checked against the same bundle on the CPU, and the encoders against
their CPU results; the KV cache must stay on the device.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.types import GenerationParams
from synthetic_media import make_image, tone

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="onnxruntime has no CUDAExecutionProvider (install the gpu extra)")

IMAGE_PROMPT = [{"role": "user", "content": [{"type": "image", "image": make_image(640, 400, seed=5)},
                                             {"type": "text", "text": "What is in this picture?"}]}]


def _greedy(pipe: Pipeline, messages, n: int = 16) -> list[int]:
    pipe.kv.reset()
    return [t for c in pipe.generate(messages, GenerationParams(max_tokens=n, temperature=0.0)) for t in c.token_ids]


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def fp16_pipes(int4_fp16_bundle):
    return (Pipeline.load(int4_fp16_bundle, provider="cuda", context_length=2048),
            Pipeline.load(int4_fp16_bundle, provider="cpu", context_length=2048))


@pytest.fixture(scope="module")
def gpu_without_graph(int4_fp16_bundle):
    return Pipeline.load(int4_fp16_bundle, provider="cuda", context_length=2048, cuda_graph=False)


def test_fp16_decoder_keeps_its_kv_cache_on_the_gpu(fp16_pipes):
    gpu, _ = fp16_pipes
    assert gpu.provider == "cuda" and gpu.decoder.cuda_graph
    assert gpu.kv.dtype == np.float16
    assert all(k.device_name() == "cuda" and v.device_name() == "cuda" for k, v in gpu.kv._buffers)
    providers = gpu.decoder.session.get_providers()
    assert providers[0] == "CUDAExecutionProvider", providers


def test_fp16_decoder_on_gpu_matches_cpu(fp16_pipes):
    gpu, cpu = fp16_pipes
    for messages in ([{"role": "user", "content": "Tell me a story about a lighthouse."}], IMAGE_PROMPT):
        a, b = gpu.prompt_logits(messages, cache_prompt=False)[0], cpu.prompt_logits(messages, cache_prompt=False)[0]
        assert _cosine(a, b) >= 0.999
        assert int(a.argmax()) == int(b.argmax())


def test_fp16_greedy_tokens_on_gpu_match_cpu(fp16_pipes):
    gpu, cpu = fp16_pipes
    ours, ref = _greedy(gpu, IMAGE_PROMPT), _greedy(cpu, IMAGE_PROMPT)
    # fp16 sums in another order can flip a near-tie late in a sequence; the first tokens must agree.
    assert ours[:8] == ref[:8], (ours, ref)


def test_warm_follow_up_on_gpu_matches_a_cold_run(fp16_pipes):
    """KV reuse across turns with the cache on the device."""
    gpu, _ = fp16_pipes
    first = IMAGE_PROMPT
    gpu.kv.reset()
    reply = "".join(c.text for c in gpu.generate(first, GenerationParams(max_tokens=6, temperature=0.0)))
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    warm = list(gpu.generate(follow, GenerationParams(max_tokens=8, temperature=0.0)))
    assert warm[-1].usage.cached_prompt_tokens > 64
    assert [t for c in warm for t in c.token_ids] == _greedy(gpu, follow, 8)


def test_encoders_on_gpu_match_cpu(fp16_pipes):
    gpu, cpu = fp16_pipes
    img = make_image(1000, 400, seed=9)
    a = gpu.vision.encode(gpu.vision.prepare(img))
    b = cpu.vision.encode(cpu.vision.prepare(img))
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.abs(b).max()))
    if cpu.audio is not None:
        clip = tone(2.0)
        np.testing.assert_allclose(gpu.audio.encode(clip), cpu.audio.encode(clip), rtol=1e-3,
                                   atol=1e-3 * float(np.abs(cpu.audio.encode(clip)).max()))


def test_fp32_bundle_on_cuda_warns_and_still_matches(fp32_bundle, caplog):
    """CUDA's GroupQueryAttention has no fp32 kernel: the node runs on the CPU, the KV stays on the host."""
    with caplog.at_level(logging.WARNING):
        gpu = Pipeline.load(fp32_bundle, provider="cuda", context_length=1024)
    assert "--decoder-dtype fp16" in caplog.text
    assert all(k.device_name() == "cpu" for k, _ in gpu.kv._buffers)
    cpu = Pipeline.load(fp32_bundle, provider="cpu", context_length=1024)
    messages = [{"role": "user", "content": "Hello there"}]
    assert _cosine(gpu.prompt_logits(messages, cache_prompt=False)[0],
                   cpu.prompt_logits(messages, cache_prompt=False)[0]) >= 0.9999


def test_cuda_graph_replay_gives_the_tokens_of_plain_runs(fp16_pipes, gpu_without_graph):
    """Decode steps replay one captured graph while the context grows, across conversations of other
    lengths and after prefills (which run uncaptured): the ids must equal those of plain runs."""
    gpu, _ = fp16_pipes
    text = [{"role": "user", "content": "Count the stars over the sea, one by one, slowly."}]
    for messages in (IMAGE_PROMPT, text, IMAGE_PROMPT):
        assert _greedy(gpu, messages, 24) == _greedy(gpu_without_graph, messages, 24)


def test_prompt_lookup_between_captured_decode_steps(fp16_pipes, monkeypatch):
    """Verify steps (several positions, uncaptured, their own logits buffer) between replays of the
    captured one-position step: the cache holds what was generated, the verify rows agree with single
    steps, and a plain run afterwards still gives the plain tokens."""
    from minicpmo.runtime import generate

    gpu, _ = fp16_pipes
    plain = _greedy(gpu, IMAGE_PROMPT, 24)
    prompt = list(gpu.last_prompt_ids)

    def oracle(history, max_tokens, ngrams=None):
        done = len(history) - len(prompt)
        draft = np.array(plain[done:done + max_tokens], dtype=np.int64)
        draft[1::2] = np.where(draft[1::2] > 0, draft[1::2] - 1, 1)  # every other token wrong
        return draft

    monkeypatch.setattr(generate, "lookup_draft", oracle)
    gpu.kv.reset()
    chunks = list(gpu.generate(IMAGE_PROMPT, GenerationParams(max_tokens=24, temperature=0.0, lookup=3)))
    ours = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].usage.accepted_draft_tokens > 0
    assert gpu.kv.keys[len(prompt):] == ours[:-1]
    # fp16 sums in another batch shape may flip a late near-tie; the start must agree
    assert ours[:8] == plain[:8], (ours, plain)
    monkeypatch.undo()
    assert _greedy(gpu, IMAGE_PROMPT, 24) == plain
