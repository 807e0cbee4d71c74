"""Audio end to end: the pipeline's greedy ids equal a torch reference built from the same prompt ids,
for audio only, audio plus an image, and a clip longer than 30 s."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from minicpmo.export.hf_config import load_config  # noqa: E402
from minicpmo.export.reference import greedy_generate, load_weights, reference_image_embeds  # noqa: E402
from minicpmo.export.reference.audio import clip_embeddings  # noqa: E402
from minicpmo.export.reference.decoder import embed  # noqa: E402
from minicpmo.export.reference.prompt import image_bounds, load_tokenizer, stop_ids  # noqa: E402
from minicpmo.runtime.pipeline import Pipeline  # noqa: E402
from minicpmo.runtime.types import GenerationParams  # noqa: E402
from synthetic_media import make_image, tone  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, fp32_bundle):
    weights = load_weights(tiny_checkpoint, prefixes=None)
    return weights, load_config(tiny_checkpoint), Pipeline.load(fp32_bundle, provider="cpu", context_length=4096)


def _audio_bounds(tok, ids):
    start, end = tok.token_to_id("<|audio_start|>"), tok.token_to_id("<|audio_end|>")
    ids = list(ids)
    return [(i + 1, j) for i, j in zip([k for k, t in enumerate(ids) if t == start],
                                       [k for k, t in enumerate(ids) if t == end], strict=True)]


def _reference_ids(weights, cfg, tokenizer_dir, prompt_ids, images, clips, n=32):
    tok, _ = load_tokenizer(tokenizer_dir)
    x = embed(weights, prompt_ids)
    rows, bounds = [], []
    if images:
        rows.append(reference_image_embeds(weights, cfg, images).reshape(-1, x.shape[-1]))
        bounds += image_bounds(tok, prompt_ids)
    if clips:
        rows.append(torch.cat(clip_embeddings(weights, cfg, clips)))
        bounds += _audio_bounds(tok, prompt_ids)
    index = torch.tensor([i for s, e in bounds for i in range(s, e)])
    x[0, index] = torch.cat(rows)[: len(index)]
    return greedy_generate(weights, cfg, x, n, stop_ids(tokenizer_dir))


@pytest.mark.parametrize("case", ["audio only", "audio and image", "clip over 30 s"])
def test_audio_greedy_ids_match_reference(case, setup, tiny_checkpoint):
    weights, cfg, pipe = setup
    clips = [tone(2.5)] if case != "clip over 30 s" else [tone(31.3, 300.0, 1)]
    images = [make_image(400, 300)] if case == "audio and image" else []
    content = ([{"type": "image", "image": im} for im in images] + [{"type": "audio", "audio": c} for c in clips]
               + [{"type": "text", "text": "What do you hear?"}])
    pipe.kv.reset()
    chunks = list(pipe.generate([{"role": "user", "content": content}], GenerationParams(max_tokens=32)))
    ours = [t for c in chunks for t in c.token_ids]
    ref = _reference_ids(weights, cfg, tiny_checkpoint, pipe.last_prompt_ids, images, clips)
    assert ours == list(ref)


def test_audio_prompt_layout(setup, tiny_checkpoint):
    """TTS template (no default system prompt), 1 s chunks of 25 tokens, bounds inside the markers."""
    _, _, pipe = setup
    pipe.kv.reset()
    list(pipe.generate([{"role": "user", "content": [{"type": "audio", "audio": tone(2.5)},
                                                      {"type": "text", "text": "Hi"}]}],
                       GenerationParams(max_tokens=1)))
    tok, _ = load_tokenizer(tiny_checkpoint)
    text = tok.decode(pipe.last_prompt_ids, skip_special_tokens=False)
    assert "You are Qwen" not in text
    assert text.endswith("<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>")
    lengths = [e - s for s, e in _audio_bounds(tok, pipe.last_prompt_ids)]
    assert lengths == [25, 25, 12]  # 2.5 s: F = 250 mel frames, C = (F-1)//2+1 = 125, T = (C-2)//2+1 = 62
