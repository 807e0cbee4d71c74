"""Pipeline: a bundle loaded for chat. Read top to bottom, one request is:

    media -> slice -> prompt (template + placeholders) -> context check -> vision (cached)
          -> embed tokens -> splice -> prefill (re-using the cached prefix) -> decode -> sample
          -> detokenize -> stop strings -> GenerationChunk stream
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import ContextLengthError, InputError
from .generate import Decoder, StepStats, generate_tokens
from .kv_cache import KVCache
from .manifest import Manifest, load_manifest
from .preprocess.image import SlicingParams
from .preprocess.prompt import build_prompt
from .sampler import make_sampler
from .sessions import EmbeddingTable, create_session, resolve_provider
from .splice import splice_embeddings
from .stopping import StopMatcher
from .tokenizer import StreamingDetokenizer, Tokenizer
from .types import GenerationChunk, GenerationParams, Message, Usage
from .vision import PreparedImage, VisionEncoder

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096
ROLES = ("system", "user", "assistant")


class Pipeline:
    """A loaded bundle. Not thread-safe: run one generation at a time."""

    def __init__(self, manifest: Manifest, provider: str = "auto", threads: int | None = None,
                 context_length: int | None = None, image_cache_bytes: int = 256 * 1024 * 1024):
        t0 = time.perf_counter()
        self.manifest = manifest
        self.provider = resolve_provider(provider)
        dec = manifest["decoder"]
        self.context_length = min(context_length or DEFAULT_CONTEXT, dec["max_position_embeddings"])
        self.model_name = manifest.name
        tok = manifest["tokenizer"]
        self.tokenizer = Tokenizer(manifest.path(tok["file"]))
        self.chat_template = manifest.path(tok["chat_template"]).read_text(encoding="utf-8")
        self.special = tok["special_tokens"]
        self.stop_ids = set(tok["stop_token_ids"])
        self.params = SlicingParams.from_dict(manifest["preprocessing"])
        emb = manifest["embeddings"]
        self.embed = EmbeddingTable(manifest.path(emb["file"]), emb["dtype"], emb["shape"])
        session = create_session(manifest.path(dec["file"]), self.provider, threads)
        device = "cuda" if self.provider == "cuda" else "cpu"
        self.kv = KVCache(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], self.context_length,
                          io_names=dec["io"], device=device)
        self.decoder = Decoder(session, dec["io"], self.kv, dec["vocab_size"])
        vis = manifest["vision"]
        self.vision = VisionEncoder(create_session(manifest.path(vis["file"]), self.provider, threads),
                                    self.params, vis["batch_size"], image_cache_bytes)
        self.last_prompt_ids: list[int] = []
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def load(cls, bundle: str | Path, **kw) -> Pipeline:
        """Open a bundle folder (checks the manifest and file sizes/hashes first)."""
        return cls(load_manifest(bundle, verify=kw.pop("verify", False)), **kw)

    # -- one request ---------------------------------------------------------------------------
    def generate(self, messages: list[Message], params: GenerationParams | None = None) -> Iterator[GenerationChunk]:
        """Stream the assistant's reply. Bad input raises (InputError...) before the first chunk."""
        params = params or GenerationParams()
        sampler = make_sampler(params)
        usage = Usage()
        images = [self.vision.prepare(img) for img in _images_in(messages)]
        prompt = build_prompt(messages, [im.grid for im in images], self.tokenizer, self.chat_template,
                              self.params, self.special)
        ids = np.asarray(prompt.token_ids, dtype=np.int64)
        usage.prompt_tokens = len(ids)
        self.last_prompt_ids = ids.tolist()
        max_tokens = self._check_context(len(ids), params.max_tokens)
        t0 = time.perf_counter()
        embeds, keys = self._prompt_embeddings(ids, prompt.image_bounds, images)
        usage.vision_seconds = time.perf_counter() - t0
        stats = StepStats()
        tokens = generate_tokens(self.decoder, self.embed, embeds, keys, ids, sampler, max_tokens,
                                 self.stop_ids | set(params.stop_token_ids), stats)
        yield from self._stream_text(tokens, params, usage, stats)

    def _check_context(self, n_prompt: int, max_tokens: int) -> int:
        if max_tokens < 1:
            raise InputError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if n_prompt >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens, which does not fit in this model's context of "
                f"{self.context_length} tokens (leave room for at least one new token)", param="messages")
        return min(max_tokens, self.context_length - n_prompt)

    def _prompt_embeddings(self, ids: np.ndarray, bounds: np.ndarray, images: list[PreparedImage]):
        """Token embeddings with the image rows spliced in, and the per-position cache keys."""
        embeds = self.embed(ids)
        keys: list = [int(t) for t in ids]
        if images:
            rows = np.concatenate([self.vision.encode(im).reshape(-1, embeds.shape[1]) for im in images])
            embeds = splice_embeddings(embeds, rows, bounds)
            # Image placeholders are all the same token; key them by image content instead.
            media_keys = [(im.key, j) for im in images for j in range(len(im.strips) * self.params.query_num)]
            for (start, end), k in zip(bounds, range(0, len(media_keys), self.params.query_num), strict=True):
                keys[start:end] = media_keys[k:k + (end - start)]
        return embeds, keys

    def _stream_text(self, tokens, params: GenerationParams, usage: Usage,
                     stats: StepStats) -> Iterator[GenerationChunk]:
        detok = StreamingDetokenizer(self.tokenizer, skip_special_ids=self.stop_ids)
        stops = StopMatcher(params.stop)
        stop_ids = self.stop_ids | set(params.stop_token_ids)
        finish, n, cut = "length", 0, False
        try:
            for token in tokens:
                n += 1
                if token in stop_ids:  # reported in token_ids (as in HF sequences), never as text
                    finish = "stop"
                    yield GenerationChunk(token_ids=[token])
                    break
                text, stopped = stops.feed(detok.add(token))
                yield GenerationChunk(text=text, token_ids=[token])
                if stopped:  # the text after a stop string is dropped, held-back text included
                    finish, cut = "stop", True
                    break
            if not cut:
                tail, _ = stops.feed(detok.flush())
                tail += stops.flush()
                if tail:
                    yield GenerationChunk(text=tail)
        finally:
            tokens.close()
        usage.completion_tokens = n
        usage.cached_prompt_tokens = stats.cached_tokens
        usage.prefill_seconds, usage.decode_seconds = stats.prefill_seconds, stats.decode_seconds
        yield GenerationChunk(finish_reason=finish, usage=usage)


def _images_in(messages: list[Message]) -> list:
    """The images of a conversation in prompt order (video frames count as images)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}]: role must be one of {ROLES}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image":
                    out.append(part["image"])
                elif part.get("type") == "video":
                    out.extend(part["frames"])
    return out
