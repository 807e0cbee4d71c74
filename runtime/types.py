"""Plain data types shared by the pipeline, the CLI and the server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A chat message is a dict, as in the OpenAI API but with decoded media:
#   {"role": "system" | "user" | "assistant",
#    "content": str | list[part]}
# where a part is one of
#   {"type": "text", "text": str}
#   {"type": "image", "image": PIL.Image.Image | str, "max_slices": int}  # str: path, URL, data URI, base64;
#                                                     # max_slices (optional): at most this many slices (1: none)
#   {"type": "audio", "audio": np.ndarray}        # float32 mono 16 kHz samples
#   {"type": "video", "frames": list[PIL.Image.Image | str], "max_slices": int}  # max_slices default 2
# An assistant message may also carry "token_ids": the ids the model generated for it (its stop token
# left out); they are then fed back as they are, not re-tokenized from the text.
Message = dict[str, Any]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # keep tokens at least this likely relative to the most likely one; 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # False: prefill the whole prompt even where the KV cache already holds its start. With int8
    # activations (the int4 decoder's default) a cached prefix is not bit-identical to a cold prefill,
    # so a greedy reply can differ; a cold prefill is reproducible run to run.
    cache_prompt: bool = True
    # Prompt lookup decoding: feed up to this many draft tokens per step, copied from where the last
    # tokens occurred earlier in the conversation (0 = off). Tokens are drawn as in plain decoding (in
    # fp32 the same reply; with int8 activations up to rounding, as with cache_prompt). A step that
    # verifies drafts costs more than a plain one, so it pays off when replies repeat their context
    # (quoting, extraction, editing), not on free text.
    lookup: int = 0
    # Structured output, in OpenAI's shapes: None or {"type": "text"}; {"type": "json_object"}; or
    # {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}. Sampling is constrained
    # to the grammar, so the reply parses (unless max_tokens cuts it: finish_reason "length").
    response_format: Mapping[str, Any] | None = None
    # Report each generated token's log probability (and the top_logprobs most likely alternatives,
    # 0..20): log-softmax of the model's logits at that step, before penalties, temperature or grammar.
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability; `top` holds the most likely tokens at its step (themselves with no `top`)."""

    token_id: int
    token: str  # its text (U+FFFD where it holds part of a UTF-8 character)
    bytes: bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    vision_seconds: float = 0.0
    draft_tokens: int = 0  # prompt lookup: draft tokens verified
    accepted_draft_tokens: int = 0  # ... and kept
    speech: Any = None  # runtime.speech.SpeechStats of a spoken reply

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_prompt_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first completion token comes out of the prefill; the rest are decode steps
        n = max(self.completion_tokens - 1, 0)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
        }


@dataclass
class GenerationChunk:
    """One step of a streamed generation. `text` is the new, complete-UTF-8 text since the last chunk."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | None while running
    usage: Usage | None = None  # set on the final chunk
    audio: np.ndarray | None = None  # speech: float32 samples at 24 kHz, after all the text
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids that is part of the reply
