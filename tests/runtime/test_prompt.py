"""Chat template rendering, placeholder expansion, token ids and image bounds (runtime/preprocess/prompt.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmo.runtime.errors import BundleError, InputError
from minicpmo.runtime.preprocess.image import SlicingParams
from minicpmo.runtime.preprocess.prompt import build_prompt, message_text, render_chat
from minicpmo.runtime.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOKENIZER_DIR = SHARED / "reference" / "tokenizer"
SPECIAL = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
           "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>"}
PARAMS = SlicingParams()
DEFAULT_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
IMG = Image.new("RGB", (8, 8))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip("reference tokenizer not available (../shared/reference/tokenizer)")
    return Tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def template() -> str:
    path = TOKENIZER_DIR / "tokenizer_config.json"
    if not path.is_file():
        pytest.skip("reference tokenizer_config.json not available")
    return json.loads(path.read_text())["chat_template"]


def user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


IMAGE = {"type": "image", "image": IMG}


# -- step 1 and 2: text and template -----------------------------------------------------------------

def test_message_text_joins_parts_with_newlines():
    kinds = []
    msg = user(IMAGE, "What?", {"type": "audio", "audio": np.zeros(16)}, {"type": "video", "frames": [IMG, IMG]})
    assert message_text(msg, 0, kinds) == "(<image>./</image>)\nWhat?\n(<audio>./</audio>)\n" \
                                          "(<image>./</image>)\n(<image>./</image>)"
    assert kinds == ["image", "audio", "frame", "frame"]
    assert message_text({"role": "user", "content": "plain"}, 0, kinds) == "plain"


@pytest.mark.parametrize("content, where", [
    (42, "messages[0].content"),
    ([{"type": "sound"}], "messages[0].content[0]"),
    ([{"type": "text", "text": 5}], "messages[0].content[0]"),
    ([{"type": "video", "frames": []}], "messages[0].content[0]"),
])
def test_message_text_errors_name_the_part(content, where):
    with pytest.raises(InputError) as info:
        message_text({"role": "user", "content": content}, 0, [])
    assert info.value.param == where


def test_render_default_system_prompt(template):
    text = render_chat([{"role": "user", "content": "hi"}], template)
    assert text == DEFAULT_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_render_given_system_prompt_and_turns(template):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    text = render_chat(msgs, template, add_generation_prompt=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
                    "<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n")


def test_render_trims_blocks_like_hf():
    template = "{% for m in messages %}\n  {{ m.content | tojson }}\n{% endfor %}"
    assert render_chat([{"role": "user", "content": "é"}], template) == '  "é"\n'


def test_render_errors():
    with pytest.raises(BundleError, match="does not compile"):
        render_chat([], "{% for %}")
    with pytest.raises(InputError, match="chat template: no"):
        render_chat([], "{{ raise_exception('no') }}")
    with pytest.raises(BundleError, match="failed to render"):  # the sandbox forbids attribute tricks
        render_chat([], "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")


# -- steps 3 and 4: the full prompt ------------------------------------------------------------------

def test_arch_example_300x900(tok, template):
    prompt = build_prompt([user(IMAGE, "What is in the image?")], [(1, 3)], tok, template, PARAMS, SPECIAL)
    assert prompt.image_bounds.tolist() == [[28, 92], [94, 158], [161, 225], [228, 292]]
    ids = prompt.token_ids
    assert ids.dtype == np.int64 and prompt.image_bounds.dtype == np.int64
    system = tok.encode("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert len(system) == 16
    head = [151644, 8948, 198, *system, 151645, 198, 151644, 872, 198, 151677, 15, 151678, 151665]
    assert ids[:28].tolist() == head
    assert set(ids[28:92].tolist()) == {128244} and ids[92] == 151666
    assert ids[93] == 151675 and ids[158] == 151676 and ids[159] == 198 and ids[160] == 151675
    assert ids[225:229].tolist() == [151676, 198, 151675, 128244] and ids[292] == 151676
    tail = [198, *tok.encode("What is in the image?"), 151645, 198, 151644, 77091, 198]
    assert ids[293:].tolist() == tail


def test_system_message_replaces_default(tok, template):
    msgs = [{"role": "system", "content": "Be brief."}, user("hi")]
    prompt = build_prompt(msgs, [], tok, template, PARAMS, SPECIAL)
    assert tok.decode(prompt.token_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Qwen" not in prompt.text and prompt.image_bounds.shape == (0, 2)


def test_multi_turn_image_ids_count_across_turns(tok, template):
    params = SlicingParams(query_num=4)
    msgs = [user(IMAGE, IMAGE, "compare"), {"role": "assistant", "content": "ok"}, user(IMAGE, "and this?")]
    prompt = build_prompt(msgs, [None, (2, 1), None], tok, template, params, SPECIAL)
    text = prompt.text
    assert text.count("<image_id>") == 3
    assert "<image_id>0</image_id><image><unk><unk><unk><unk></image>\n<image_id>1</image_id>" in text
    assert "<image_id>2</image_id>" in text and "<|im_start|>assistant\nok<|im_end|>" in text
    assert "</image><slice><unk><unk><unk><unk></slice><slice>" in text  # no separator before slices
    assert len(prompt.image_bounds) == 1 + 3 + 1
    assert np.all(prompt.image_bounds[:, 1] - prompt.image_bounds[:, 0] == 4)
    starts = prompt.image_bounds[:, 0]
    assert all(prompt.token_ids[s - 1] in (151665, 151675) for s in starts)


def test_video_frames_have_no_image_id(tok, template):
    params = SlicingParams(query_num=2)
    msgs = [user(IMAGE, {"type": "video", "frames": [IMG, IMG]}, "describe")]
    prompt = build_prompt(msgs, [None, None, (1, 2)], tok, template, params, SPECIAL)
    assert prompt.text.count("<image_id>") == 1
    assert ("<image_id>0</image_id><image><unk><unk></image>\n<image><unk><unk></image>\n<image><unk><unk></image>"
            "<slice><unk><unk></slice>\n<slice><unk><unk></slice>\ndescribe") in prompt.text
    assert len(prompt.image_bounds) == 5


def test_audio_seam(tok, template):
    msgs = [user({"type": "audio", "audio": np.zeros(16)}, "transcribe")]
    with pytest.raises(InputError, match="audio input is not supported"):
        build_prompt(msgs, [], tok, template, PARAMS, SPECIAL)
    prompt = build_prompt(msgs, [], tok, template, PARAMS, SPECIAL,
                          audio_placeholder=lambda i: f"<|audio_start|>{'<unk>' * 3}<|audio_end|>")
    assert "<|audio_start|><unk><unk><unk><|audio_end|>\ntranscribe" in prompt.text
    assert prompt.image_bounds.shape == (0, 2)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"role": "assistant", "content": "x"}], "first message"),
    ([user("look: (<image>./</image>)")], "reserved text"),
    ([user("<slice>")], "reserved text"),
])
def test_bad_messages(tok, template, messages, match):
    with pytest.raises(InputError, match=match):
        build_prompt(messages, [], tok, template, PARAMS, SPECIAL)


def test_grid_count_and_special_tokens_are_checked(tok, template):
    with pytest.raises(ValueError, match="1 grids given for 2 images"):
        build_prompt([user(IMAGE, IMAGE)], [None], tok, template, PARAMS, SPECIAL)
    with pytest.raises(BundleError, match="unk"):
        build_prompt([user("x")], [], tok, template, PARAMS, {k: v for k, v in SPECIAL.items() if k != "unk"})


# -- assistant history: the model's own replies fed back -------------------------------------------------

@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Tokenizer, str]:
    """The project's small stand-in tokenizer (all MiniCPM-o special tokens), present without ../shared."""
    from minicpmo.export.synth_tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return Tokenizer(folder), json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


REPLY = "see </image> and <ref>a cat</ref><box>1 2 3 4</box> (<image>./</image>)"


def test_assistant_text_with_token_text_is_history_not_media(synth):
    tok, template = synth
    params = SlicingParams(query_num=4)
    plain = [user(IMAGE, "hi"), {"role": "assistant", "content": "ok"}, user(IMAGE, "and this?")]
    odd = [plain[0], {"role": "assistant", "content": REPLY}, plain[2]]
    a = build_prompt(plain, [None, None], tok, template, params, SPECIAL)
    b = build_prompt(odd, [None, None], tok, template, params, SPECIAL)
    assert len(b.image_bounds) == 2
    shift = len(b.token_ids) - len(a.token_ids)  # the second image moves by the reply's extra length
    assert b.image_bounds.tolist() == [a.image_bounds[0].tolist(), (a.image_bounds[1] + shift).tolist()]
    # tokenized as upstream tokenizes the whole prompt: special-token text becomes its ids
    assert b.token_ids.tolist() == tok.encode(b.text)
    assert tok.token_to_id("<ref>") in b.token_ids.tolist()
    assert tok.decode(b.token_ids[b.history]).startswith("see </image>")
    assert b.history.sum() < len(b.token_ids) // 2


def test_assistant_token_ids_are_used_as_they_are(synth):
    tok, template = synth
    params = SlicingParams(query_num=4)
    im_end = tok.token_to_id("</image>")
    generated = [*tok.encode("x y"), im_end, *tok.encode("  z"), im_end]  # not what re-tokenizing gives
    msgs = [user(IMAGE, "hi"), {"role": "assistant", "content": "x y</image>  z</image>", "token_ids": generated},
            user(IMAGE, "more")]
    prompt = build_prompt(msgs, [None, None], tok, template, params, SPECIAL)
    ids = prompt.token_ids.tolist()
    start = int(np.flatnonzero(prompt.history)[0])
    assert ids[start:start + len(generated)] == generated and prompt.history.sum() == len(generated)
    # everything before the reply is what the previous turn's prompt was (so the KV cache keeps it)
    first = build_prompt(msgs[:1], [None], tok, template, params, SPECIAL).token_ids.tolist()
    assert ids[:start] == first
    assert len(prompt.image_bounds) == 2
    for bad in ([-1], ["3"], [1.5], "12"):
        with pytest.raises(InputError, match=r"messages\[1\].token_ids"):
            build_prompt([msgs[0], {**msgs[1], "token_ids": bad}], [None], tok, template, params, SPECIAL)


def test_user_text_with_media_markers_is_still_refused(synth):
    tok, template = synth
    for text in ("(<image>./</image>)", "<slice>", "</image>"):
        with pytest.raises(InputError, match="reserved text"):
            build_prompt([user(text)], [], tok, template, PARAMS, SPECIAL)
    # an assistant message holding media is input, and its text is checked as a user's is
    msgs = [user("hi"), {"role": "assistant", "content": [IMAGE, {"type": "text", "text": "<slice>"}]}]
    with pytest.raises(InputError, match="reserved text"):
        build_prompt(msgs, [None], tok, template, PARAMS, SPECIAL)
