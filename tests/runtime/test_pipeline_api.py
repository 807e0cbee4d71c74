"""The Python API on a real tiny bundle: image parts as strings, max_slices, assistant history fed back
as token ids or as text holding special tokens, tool histories, the text upstream strips."""

from __future__ import annotations

from pathlib import Path

import pytest

from minicpmo.runtime.errors import InputError
from minicpmo.runtime.generate import StepStats
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.types import GenerationParams, Usage

DEMO_IMAGE = Path(__file__).resolve().parents[2] / "cli" / "assets" / "demo.png"
GREEDY = GenerationParams(max_tokens=6, cache_prompt=False)


@pytest.fixture(scope="module")
def pipe(fp32_bundle) -> Pipeline:
    return Pipeline.load(fp32_bundle, provider="cpu", context_length=1024)


def run(pipe, messages, params=GREEDY):
    chunks = list(pipe.generate(messages, params))
    ids = [t for c in chunks for t in c.token_ids]
    return "".join(c.text for c in chunks), ids, chunks[-1]


def ask(image, text="What is it?", **part):
    return [{"role": "user", "content": [{"type": "image", "image": image, **part}, {"type": "text", "text": text}]}]


def test_an_image_part_may_be_a_path_or_a_data_uri(pipe):
    import base64

    from PIL import Image

    pil = Image.open(DEMO_IMAGE).convert("RGB")
    uri = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    expected = run(pipe, ask(pil))[1]
    assert run(pipe, ask(str(DEMO_IMAGE)))[1] == expected
    assert run(pipe, ask(DEMO_IMAGE))[1] == expected
    assert run(pipe, ask(uri))[1] == expected
    with pytest.raises(InputError, match="an image must be a PIL image"):
        run(pipe, ask(42))
    with pytest.raises(InputError, match="max_slices must be an integer >= 1"):
        run(pipe, ask(pil, max_slices=0))


def test_max_slices_on_an_image_part(pipe):
    from synthetic_media import make_image

    big = make_image(1344, 896, seed=2)
    counts = {n: run(pipe, ask(big, max_slices=n) if n else ask(big))[2].usage.prompt_tokens for n in (None, 1, 2)}
    assert counts[1] < counts[2] < counts[None]


def test_a_reply_fed_back_as_token_ids_stays_cached(pipe):
    first = [{"role": "user", "content": "Hello"}]
    params = GenerationParams(max_tokens=12)
    text, ids, last = run(pipe, first, params)
    if last.finish_reason == "stop":
        ids = ids[:-1]
    history = first + [{"role": "assistant", "content": text, "token_ids": ids},
                       {"role": "user", "content": [{"type": "image", "image": str(DEMO_IMAGE)},
                                                    {"type": "text", "text": "And this?"}]}]
    _, _, second = run(pipe, history, params)
    assert second.usage.cached_prompt_tokens == last.usage.prompt_tokens + last.usage.completion_tokens - 1
    with pytest.raises(InputError, match="outside the vocabulary"):
        run(pipe, first + [{**history[1], "token_ids": [10**9]}, history[2]])


def test_reply_text_with_special_tokens_before_an_image(pipe):
    """As a client sends a model's reply back: any token text in it, then an image in the next turn."""
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "a </image> b <slice> c <ref>d</ref> (<image>./</image>)"},
                *ask(str(DEMO_IMAGE))]
    text, ids, last = run(pipe, messages)
    assert last.finish_reason in ("stop", "length") and ids


def test_a_tool_history_renders_with_the_template(pipe):
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "3 C"},
                {"role": "user", "content": "Coat?"}]
    run(pipe, messages)
    prompt = pipe.tokenizer.decode(pipe.last_prompt_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\n3 C\n</tool_response><|im_end|>" in prompt


def test_reply_text_leaves_out_what_upstream_strips(pipe):
    tok = pipe.tokenizer
    tts_eos = pipe.token_ids["<|tts_eos|>"]
    assert pipe.hidden_ids == pipe.stop_ids | {tts_eos}
    words = tok.encode("the cat")
    ref = tok.token_to_id("<ref>")
    tokens = (t for t in [words[0], tts_eos, *words[1:], ref])  # a generator, as generate_tokens gives
    chunks = list(pipe._stream_text(tokens, GenerationParams(), Usage(), StepStats()))
    # <|tts_eos|> is removed, as upstream chat() removes it; grounding tokens such as <ref> stay
    assert "".join(c.text for c in chunks) == tok.decode([*words, ref])
    assert tts_eos in [t for c in chunks for t in c.token_ids]  # still reported as a token
