"""Chat messages -> prompt token ids and image bounds, as upstream chat() + the processor build them.

1. Each message's parts become one string: an image is the marker "(<image>./</image>)", an audio clip
   "(<audio>./</audio>)", a video one image marker per frame; parts are joined with "\\n".
2. The chat template (jinja2, rendered like Hugging Face's apply_chat_template) wraps the messages.
3. Each marker is replaced by its placeholder text (image id, <image><unk>*64</image>, slice rows).
4. The text is tokenized; image bounds are read back from the ids: one [start, end) per slice.

An assistant message with text only is history, not input: its text may hold any token text (the
model's own replies contain `</image>`, `<ref>`, ...), tokenized with special tokens parsed as
upstream does, and its positions are left out of the image and audio bound search. When it carries
`token_ids` (the ids the model produced, as `minicpmo chat` keeps them), those ids are used as they
are, so a reply fed back gives the same ids and the KV cache keeps all of it.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import BundleError, InputError
from ..types import Message
from .image import SlicingParams, image_placeholder

IMAGE_MARKER = "(<image>./</image>)"
AUDIO_MARKER = "(<audio>./</audio>)"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(AUDIO_MARKER)})")
ROLES = ("system", "user", "assistant", "tool")
SPECIAL_KEYS = ("im_start", "im_end", "slice_start", "slice_end", "unk", "im_id_start", "im_id_end")
AudioPlaceholder = Callable[[int], str]  # i-th audio clip of the conversation -> its placeholder text


@dataclass
class Prompt:
    token_ids: np.ndarray  # int64 [T]
    image_bounds: np.ndarray  # int64 [n_slices, 2]: [start, end) of each slice's query_num rows
    text: str  # the expanded prompt text that was tokenized
    history: np.ndarray | None = None  # bool [T]: positions of assistant history (no media bounds there)

    def searchable_ids(self) -> np.ndarray:
        """The ids with assistant history masked out (-1): where media bound tokens are looked for."""
        return self.token_ids if self.history is None else np.where(self.history, -1, self.token_ids)


def _no_audio(i: int) -> str:
    raise InputError("audio input is not supported by this runtime yet", param="messages",
                     code="unsupported_audio")


# -- step 1: message content -> text with markers ----------------------------------------------------

def message_text(message: Message, index: int, kinds: list[str]) -> str:
    """The content of one message as text with media markers; appends "image"/"frame"/"audio" to kinds."""
    content = message.get("content")
    if content is None:
        content = ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"messages[{index}].content must be a string or a list of parts",
                         param=f"messages[{index}].content")
    pieces = []
    for j, part in enumerate(content):
        pieces.append(_part_text(part, f"messages[{index}].content[{j}]", kinds))
    return "\n".join(pieces)


def _part_text(part: Any, where: str, kinds: list[str]) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}.text must be a string", param=where)
        return text
    if kind == "image":
        kinds.append("image")
        return IMAGE_MARKER
    if kind == "audio":
        kinds.append("audio")
        return AUDIO_MARKER
    if kind == "video":
        frames = part.get("frames")
        if not isinstance(frames, list | tuple) or not frames:
            raise InputError(f"{where}.frames must be a non-empty list of images", param=where)
        kinds.extend(["frame"] * len(frames))
        return "\n".join([IMAGE_MARKER] * len(frames))
    raise InputError(f"{where}: unknown content part type {kind!r} (expected text, image, audio or video)",
                     param=where)


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}",
                             param=f"messages[{i}].role")
    if messages[0]["role"] not in ("system", "user"):
        raise InputError("the first message must come from the user or the system", param="messages[0].role")


# -- step 2: chat template ------------------------------------------------------------------------------

def _raise_exception(message: str) -> None:
    raise InputError(f"chat template: {message}", param="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


_ENV = _environment()


@functools.lru_cache(maxsize=8)
def _compile(chat_template: str):
    """Compiling a template costs ~8 ms; a bundle has one or two, so compile each once."""
    try:
        return _ENV.from_string(chat_template)
    except TemplateError as e:
        raise BundleError(f"chat template does not compile: {e}") from e


def render_chat(messages: list[dict[str, Any]], chat_template: str, add_generation_prompt: bool = True,
                **template_kwargs: Any) -> str:
    """Render text-only messages ({"role", "content": str}) with a Hugging Face chat template."""
    template = _compile(chat_template)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **template_kwargs)
    except TemplateError as e:  # raise_exception() raises InputError, which passes through
        raise BundleError(f"chat template failed to render: {e}") from e


# -- steps 3 and 4: placeholders, tokens, bounds ---------------------------------------------------------

def build_prompt(messages: list[Message], grids: list[tuple[int, int] | None], tokenizer,
                 chat_template: str, params: SlicingParams, special: dict[str, str], *,
                 audio_placeholder: AudioPlaceholder = _no_audio,
                 add_generation_prompt: bool = True) -> Prompt:
    """Token ids and image bounds of a conversation.

    Args:
        messages: runtime/types.Message dicts.
        grids: (cols, rows) or None of every image and video frame, in conversation order.
        tokenizer: runtime.tokenizer.Tokenizer.
        chat_template: the jinja template text (the caller picks the TTS one when audio is present).
        params: slicing constants (query_num, use_image_id, slice_mode).
        special: token strings from the manifest: im_start, im_end, slice_start, slice_end, unk,
            im_id_start, im_id_end.
        audio_placeholder: text for the i-th audio clip; the default refuses audio (the pipeline passes one).
    """
    missing = [k for k in SPECIAL_KEYS if k not in special]
    if missing:
        raise BundleError(f"special tokens missing from the manifest: {', '.join(missing)}")
    _check_messages(messages)
    kinds: list[str] = []
    tag = f"\x00{secrets.token_hex(8)}:"  # stands for an assistant history message until tokenizing
    rendered = [_template_message(m, i, tag, kinds, special) for i, m in enumerate(messages)]
    n_visual = sum(kind != "audio" for kind in kinds)
    if len(grids) != n_visual:
        raise ValueError(f"{len(grids)} grids given for {n_visual} images and video frames")
    text = render_chat(rendered, chat_template, add_generation_prompt)
    text = _expand_markers(text, kinds, grids, params, special, audio_placeholder)
    ids, history, text = _tokenize_with_history(text, tag, messages, tokenizer)
    prompt = Prompt(ids, np.zeros((0, 2), dtype=np.int64), text, history)
    bounds = image_bounds(prompt.searchable_ids(), tokenizer, special)
    expected = sum(1 + (g[0] * g[1] if g and params.slice_mode else 0) for g in grids)
    if len(bounds) != expected or np.any(bounds[:, 1] - bounds[:, 0] != params.query_num):
        raise InputError("the prompt's image placeholders do not line up with its images; does a message "
                         "contain image tokens as text?", param="messages")
    prompt.image_bounds = bounds
    return prompt


def _template_message(message: Message, index: int, tag: str, kinds: list[str],
                      special: dict[str, str]) -> dict[str, Any]:
    """What the chat template sees of one message: its text (a history message's as a tag that
    _tokenize_with_history replaces) and an assistant's tool calls."""
    out: dict[str, Any] = {"role": message["role"]}
    if _is_history(message):
        has_text = bool(message_text(message, index, [])) or message.get("token_ids")
        out["content"] = f"{tag}{index}\x00" if has_text else ""
    else:
        out["content"] = _checked_text(message, index, kinds, special)
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def _is_history(message: Message) -> bool:
    """An assistant message of text only (or with the token ids it was generated as)."""
    if message["role"] != "assistant":
        return False
    content = message.get("content")
    if not isinstance(content, list):
        return True
    return all(isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text") for p in content)


def _history_ids(message: Message, index: int) -> list[int] | None:
    ids = message.get("token_ids")
    if ids is None:
        return None
    if not isinstance(ids, list | tuple | np.ndarray) or not all(
            isinstance(t, int | np.integer) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InputError(f"messages[{index}].token_ids must be a list of non-negative token ids",
                         param=f"messages[{index}].token_ids")
    return [int(t) for t in ids]


def _tokenize_with_history(text: str, tag: str, messages: list[Message], tokenizer):
    """Token ids of the expanded prompt, the mask of assistant history positions, and the prompt text.

    The text around history messages is tokenized in one piece with the history text in it (as
    upstream tokenizes the whole prompt); a message with token_ids splits the text there and its ids
    go in as they are."""
    pieces = re.split(f"{re.escape(tag)}(\\d+)\x00", text)
    ids: list[int] = []
    mask: list[bool] = []
    pending, spans, full = "", [], []

    def flush() -> None:
        nonlocal pending
        if pending:
            piece_ids, offsets = tokenizer.encode_with_offsets(pending)
            ids.extend(piece_ids)
            mask.extend(any(s < b and a < e for s, e in spans) for a, b in offsets)
        pending = ""
        spans.clear()

    for k, piece in enumerate(pieces):
        if k % 2 == 0:
            pending += piece
            full.append(piece)
            continue
        index = int(piece)
        content = message_text(messages[index], index, [])
        full.append(content)
        given = _history_ids(messages[index], index)
        if given is None:
            spans.append((len(pending), len(pending) + len(content)))
            pending += content
        else:
            flush()
            ids.extend(given)
            mask.extend([True] * len(given))
    flush()
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), "".join(full)


def _checked_text(message: Message, index: int, kinds: list[str], special: dict[str, str]) -> str:
    text = message_text(message, index, kinds)
    # Text that spells out a marker or a bound token would shift every image after it.
    content = message.get("content")
    parts = [content] if isinstance(content, str) else [p.get("text", "") if isinstance(p, dict) else p
                                                        for p in (content or [])]
    reserved = (IMAGE_MARKER, AUDIO_MARKER, special["im_start"], special["im_end"],
                special["slice_start"], special["slice_end"])
    for part in parts:
        hit = next((r for r in reserved if isinstance(part, str) and r in part), None)
        if hit:
            raise InputError(f"messages[{index}] contains the reserved text {hit!r}",
                             param=f"messages[{index}].content")
    return text


def _expand_markers(text: str, kinds: list[str], grids: list, params: SlicingParams, special: dict[str, str],
                    audio_placeholder: AudioPlaceholder) -> str:
    chunks = _MARKERS.split(text)
    n_markers = sum(c in (IMAGE_MARKER, AUDIO_MARKER) for c in chunks)
    if n_markers != len(kinds):
        raise InputError(f"the rendered prompt holds {n_markers} media markers for {len(kinds)} media parts",
                         param="messages")
    media = iter(kinds)
    image_id = visual = audio = 0
    for i, chunk in enumerate(chunks):
        if chunk not in (IMAGE_MARKER, AUDIO_MARKER):
            continue
        kind = next(media)
        expected = AUDIO_MARKER if kind == "audio" else IMAGE_MARKER
        if chunk != expected:
            raise InputError("the chat template reordered media markers", param="messages")
        if kind == "audio":
            chunks[i] = audio_placeholder(audio)
            audio += 1
            continue
        k = image_id if kind == "image" else None  # video frames carry no image id
        chunks[i] = image_placeholder(k, grids[visual], params, special)
        image_id += kind == "image"
        visual += 1
    return "".join(chunks)


def image_bounds(ids: np.ndarray, tokenizer, special: dict[str, str]) -> np.ndarray:
    """int64 [n, 2]: from after each <image>/<slice> id to its </image>/</slice> id (upstream _convert)."""
    start_ids = [tokenizer.token_to_id(special[k]) for k in ("im_start", "slice_start")]
    end_ids = [tokenizer.token_to_id(special[k]) for k in ("im_end", "slice_end")]
    starts = np.flatnonzero(np.isin(ids, start_ids)) + 1
    ends = np.flatnonzero(np.isin(ids, end_ids))
    if len(starts) != len(ends) or np.any(ends < starts):
        raise InputError("unbalanced image/slice tokens in the prompt", param="messages")
    return np.stack([starts, ends], axis=1).astype(np.int64).reshape(-1, 2)
