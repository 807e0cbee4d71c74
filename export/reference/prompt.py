"""Reference prompt path: upstream chat() text building, chat template, placeholder expansion, bounds.

Follows modeling_minicpmo.chat() and processing_minicpmo._convert_omni_to_inputs / _convert
(ARCH §6). Token ids are looked up by their strings, never hard-coded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from PIL import Image
from tokenizers import Tokenizer

from ..hf_config import MiniCPMOConfig
from .preprocess import get_sliced_grid, image_placeholder

IMAGE_TAG = "(<image>./</image>)"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # upstream MiniCPMO.terminators


@dataclass(frozen=True)
class Prompt:
    text: str  # the expanded text that was tokenized
    ids: list[int]
    image_bounds: list[tuple[int, int]]  # [start, end) per slice, in slice order
    images: list[Image.Image]  # in conversation order


def load_tokenizer(tokenizer_dir: str | Path) -> tuple[Tokenizer, str]:
    """The `tokenizers` tokenizer and the chat template of a tokenizer folder."""
    folder = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return tok, config["chat_template"]


def token_id(tok: Tokenizer, token: str) -> int:
    tid = tok.token_to_id(token)
    if tid is None:
        raise KeyError(f"token {token!r} is not in the tokenizer")
    return tid


def messages_to_chat(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], list[Image.Image]]:
    """Upstream chat(): images become "(<image>./</image>)", items are joined with "\\n"."""
    chat, images = [], []
    for msg in messages:
        content = msg["content"]
        items = [content] if isinstance(content, str) else list(content)
        parts = []
        for item in items:
            if isinstance(item, Image.Image):
                images.append(item)
                parts.append(IMAGE_TAG)
            elif isinstance(item, str):
                parts.append(item)
            else:
                raise TypeError(f"unsupported content item {type(item).__name__} (audio is not covered here)")
        chat.append({"role": msg["role"], "content": "\n".join(parts)})
    return chat, images


def render_chat_template(template: str, chat: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Render like transformers apply_chat_template (sandboxed jinja2, trim/lstrip blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(messages=chat, add_generation_prompt=add_generation_prompt)


def expand_images(text: str, images: Sequence[Image.Image], cfg: MiniCPMOConfig) -> str:
    """Replace the k-th image tag by its placeholder (image ids count over the whole text)."""
    chunks = re.split(f"({re.escape(IMAGE_TAG)})", text)
    if sum(c == IMAGE_TAG for c in chunks) != len(images):
        raise ValueError(f"{len(images)} images but {text.count(IMAGE_TAG)} image tags in the prompt")
    k = 0
    for i, chunk in enumerate(chunks):
        if chunk == IMAGE_TAG:
            sc = cfg.slicing
            grid = get_sliced_grid(images[k].size, sc.max_slice_nums, sc.scale_resolution) if sc.slice_mode else None
            chunks[i] = image_placeholder(k, grid, cfg)
            k += 1
    return "".join(chunks)


def image_bounds(tok: Tokenizer, ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every image/slice: start = index of <image>/<slice> + 1, end = index of the closer."""
    opens = {token_id(tok, "<image>"), token_id(tok, "<slice>")}
    closes = {token_id(tok, "</image>"), token_id(tok, "</slice>")}
    starts = [i + 1 for i, t in enumerate(ids) if t in opens]
    ends = [i for i, t in enumerate(ids) if t in closes]
    if len(starts) != len(ends):
        raise ValueError(f"unbalanced image markers: {len(starts)} openers, {len(ends)} closers")
    return list(zip(starts, ends, strict=True))


def build_prompt(tokenizer_dir: str | Path, messages: Sequence[dict[str, Any]], cfg: MiniCPMOConfig) -> Prompt:
    """messages (content: str or list of str | PIL image) -> expanded text, ids and image bounds."""
    tok, template = load_tokenizer(tokenizer_dir)
    chat, images = messages_to_chat(messages)
    text = expand_images(render_chat_template(template, chat), images, cfg)
    ids = tok.encode(text, add_special_tokens=False).ids
    return Prompt(text=text, ids=ids, image_bounds=image_bounds(tok, ids), images=images)


def stop_ids(tokenizer_dir: str | Path) -> list[int]:
    tok, _ = load_tokenizer(tokenizer_dir)
    return [token_id(tok, t) for t in STOP_TOKENS]
