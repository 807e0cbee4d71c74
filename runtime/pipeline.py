"""Pipeline: a bundle loaded for chat. Read top to bottom, one request is:

    media -> slice -> prompt (template + placeholders) -> context check -> vision (cached)
          -> embed tokens -> splice -> prefill (re-using the cached prefix) -> decode -> sample
          -> detokenize -> stop strings -> GenerationChunk stream
          [speech: voice clip first, TTS template, hidden state at <|spk|> -> runtime/speech.py
           -> audio chunks after the text]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from . import spoken_reply as spoken
from .batch_decoder import slot_decoder
from .bundle_check import check_decoder, check_encoder
from .constrain import GrammarConstraint, GrammarVocabulary, schema_of
from .errors import AudioError, ContextLengthError, InputError
from .generate import Decoder, StepStats, generate_tokens, prefill_prompt
from .kv_cache import KVCache
from .manifest import Manifest, load_manifest
from .preprocess.image import SlicingParams
from .preprocess.image_io import load_image
from .preprocess.prompt import build_prompt
from .sampler import Sampler, make_sampler
from .scheduler import generate_batch
from .sessions import EmbeddingTable, create_decoder_session, create_session, kv_device, resolve_provider
from .speech import SpeechRequest
from .splice import splice_embeddings
from .stopping import StopMatcher
from .tokenizer import StreamingDetokenizer, Tokenizer
from .types import GenerationChunk, GenerationParams, Message, TokenLogprob, Usage
from .vision import PreparedImage, VisionEncoder
from .voices import Voices

VIDEO_MAX_SLICES = 2  # the model card's setting for video frames (1 on request)

log = logging.getLogger(__name__)
DEFAULT_CONTEXT = 4096
ROLES = ("system", "user", "assistant", "tool")


class Pipeline:
    """A loaded bundle. Not thread-safe: run one generation at a time."""

    def __init__(self, manifest: Manifest, provider: str = "auto", threads: int | None = None,
                 context_length: int | None = None, image_cache_bytes: int = 256 * 1024 * 1024,
                 cuda_graph: bool = True, speech: bool | None = None, parallel: int = 1):
        """speech: load the bundle's speech model now (True), on the first spoken reply (None), or
        never (False: `generate(speech=...)` then says the model cannot speak).
        parallel: KV slots of `context_length` each for decoding that many sequences together
        (`generate_batch`, the server's --parallel); slot 0 is also the one `generate` uses."""
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
        # Upstream chat() removes its terminators and <|tts_eos|> from the reply text and keeps every
        # other token's text (grounding tokens such as <ref>/<box> are part of an answer).
        tts_eos = tok["token_ids"].get(tok["special_tokens"].get("tts_eos", ""))
        self.hidden_ids = self.stop_ids | ({tts_eos} if tts_eos is not None else set())
        self.params = SlicingParams.from_dict(manifest["preprocessing"])
        emb = manifest["embeddings"]
        self.embed = EmbeddingTable(manifest.path(emb["file"]), emb["dtype"], emb["shape"])
        kv_dtype = np.dtype(dec.get("kv_dtype", "float32"))
        kv_on = kv_device(self.provider, kv_dtype)
        # A CUDA graph needs the whole decoder on the GPU: only the fp16 variant is (see kv_device).
        graph = cuda_graph and kv_on == "cuda"
        session = create_decoder_session(manifest, self.provider, threads, cuda_graph=graph)
        check_decoder(manifest, session)
        self.batch = None
        if parallel > 1:
            self.batch = slot_decoder(manifest, session, self.context_length, parallel, kv_on)
            self.kv, self.decoder = self.batch.caches.slots[0], self.batch.decoders[0]
        else:
            self.kv = KVCache(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], self.context_length,
                              io_names=dec["io"], device=kv_on, dtype=kv_dtype)
            self.decoder = Decoder(session, dec["io"], self.kv, dec["vocab_size"], cuda_graph=graph)
        vis = manifest["vision"]
        vision = create_session(manifest.path(vis["file"]), self.provider, threads, memory_arena=False)
        check_encoder(manifest, "vision", vision)
        self.vision = VisionEncoder(vision, self.params, vis["batch_size"], image_cache_bytes)
        self.tts_template = manifest.path(tok["tts_chat_template"]).read_text(encoding="utf-8")
        self.token_ids = tok["token_ids"]
        self.audio = None
        if manifest.get("audio"):
            from .audio import AudioEncoder

            aud = manifest["audio"]
            self.audio_info = aud
            audio = create_session(manifest.path(aud["file"]), self.provider, threads, memory_arena=False)
            check_encoder(manifest, "audio", audio)
            self.audio = AudioEncoder(audio, chunk_frames=aud["chunk_frames"], pool_step=aud["pool_step"])
        self.speech_info = manifest.get("speech") or {}
        self.voices = Voices(manifest.folder, self.speech_info.get("voices", {}))
        self._tts, self._speech_allowed, self._threads = None, speech is not False, threads
        if speech:
            _ = self.tts
        self.last_prompt_ids: list[int] = []
        self._grammar_vocab: GrammarVocabulary | None = None  # built on the first structured request
        self.load_seconds = time.perf_counter() - t0

    @property
    def tts(self):
        """The bundle's speech model (runtime/tts_model.py), loaded on first use; None without one."""
        if self._tts is None and self._speech_allowed and self.speech_info:
            from .tts_model import TTSModel

            self._tts = TTSModel.load(self.manifest, threads=self._threads)
        return self._tts

    @tts.setter
    def tts(self, model) -> None:  # a stand-in model, or None for "cannot speak"
        self._tts, self._speech_allowed = model, model is not None

    @classmethod
    def load(cls, bundle: str | Path, **kw) -> Pipeline:
        """Open a bundle folder (checks the manifest and file sizes/hashes first)."""
        return cls(load_manifest(bundle, verify=kw.pop("verify", False)), **kw)

    # -- one request ---------------------------------------------------------------------------
    def generate(self, messages: list[Message], params: GenerationParams | None = None,
                 speech: SpeechRequest | None = None) -> Iterator[GenerationChunk]:
        """Stream the assistant's reply; with `speech`, its audio follows the text (chunks with `audio`,
        then the final chunk). Bad input raises (InputError...) before the first chunk."""
        params = params or GenerationParams()
        sampler = self.sampler_for(params)
        if params.lookup and not self.decoder.multi_logits:
            raise InputError("prompt lookup needs a bundle exported with it (this decoder returns one "
                             "position's logits); re-export the model", param="lookup")
        speech_params = None
        if speech is not None:
            speech_params = spoken.speech_params(self, speech, params)
            messages = spoken.with_voice(self, messages, speech)
        ids, embeds, keys, usage, max_tokens = self._prepare(messages, params, speak=speech is not None)
        hidden_at = spoken.speaker_position(self.tokenizer, ids) if speech is not None else None
        stats = StepStats()
        tokens = generate_tokens(self.decoder, self.embed, embeds, keys, ids, sampler, max_tokens,
                                 self.stop_ids | set(params.stop_token_ids), stats, reuse_prefix=params.cache_prompt,
                                 lookup=params.lookup, hidden_at=hidden_at,
                                 draft_allowed=sampler.draft_allowed)
        chunks = self._stream_text(tokens, params, usage, stats, sampler)
        if speech is None:
            yield from chunks
        else:
            yield from spoken.stream_speech(self, chunks, stats, speech_params)

    def sampler_for(self, params: GenerationParams) -> Sampler:
        """One request's sampler, constrained to params.response_format; raises InputError. Any decode
        loop (this one, a batch scheduler) calls it once per token and takes `token_logprobs` after."""
        return make_sampler(params, constraint=self._constraint(params))

    def token_logprobs(self, sampler: Sampler) -> list[TokenLogprob] | None:
        """The entry of the token the sampler chose last (None unless its params ask for logprobs)."""
        if not sampler.params.logprobs:
            return None
        return [self._token_logprob(*sampler.logprobs.pop(0))]

    def _constraint(self, params: GenerationParams) -> GrammarConstraint | None:
        """The grammar constraint of params.response_format (None for text); raises InputError."""
        if schema_of(params.response_format) is None:
            return None
        if self._grammar_vocab is None:
            self._grammar_vocab = GrammarVocabulary(self.tokenizer.path.read_text(encoding="utf-8"),
                                                    self.manifest["decoder"]["vocab_size"], self.stop_ids)
        return self._grammar_vocab.constraint(params.response_format)

    def _token_logprob(self, token_id: int, logprob: float, top=()) -> TokenLogprob:
        raw = self.tokenizer.token_bytes(token_id)
        return TokenLogprob(token_id, raw.decode("utf-8", errors="replace"), raw, logprob,
                            tuple(self._token_logprob(i, lp) for i, lp in top))

    def generate_batch(self, conversations: list[list[Message]],
                       params: GenerationParams | list[GenerationParams] | None = None):
        """Stream the replies to several conversations, decoded together, as (index, GenerationChunk);
        loaded with parallel=N, N at a time (runtime/scheduler.py), else one after another."""
        return generate_batch(self, conversations, params)

    def prompt_logits(self, messages: list[Message], cache_prompt: bool = True) -> tuple[np.ndarray, int]:
        """The logits the first reply token is sampled from (a copy), and how many prompt positions
        came from the KV cache: for parity checks and for comparing bundles."""
        ids, embeds, keys, _, _ = self._prepare(messages, GenerationParams(max_tokens=1))
        stats = StepStats()
        logits = prefill_prompt(self.decoder, embeds, keys, stats, reuse_prefix=cache_prompt)
        return logits.copy(), stats.cached_tokens

    def _prepare(self, messages: list[Message], params: GenerationParams, speak: bool = False):
        """Prompt ids, their embeddings (images and audio spliced in) and cache keys, the usage so far,
        and the number of tokens the context leaves for the reply. `speak`: the TTS template."""
        usage = Usage()
        images = [self.vision.prepare(img, max_slices) for img, max_slices in _visual_parts(messages)]
        clips = _audio_parts(messages)
        template, placeholder = self._audio_prompt_parts(clips)
        if speak:
            template = self.tts_template
        extra = {"audio_placeholder": placeholder} if placeholder else {}
        prompt = build_prompt(messages, [im.grid for im in images], self.tokenizer, template,
                              self.params, self.special, **extra)
        ids = np.asarray(prompt.token_ids, dtype=np.int64)
        if len(ids) and ids.max() >= self.embed.vocab_size:
            raise InputError(f"token id {int(ids.max())} in an assistant message's token_ids is outside the "
                             f"vocabulary ({self.embed.vocab_size} ids)", param="messages")
        usage.prompt_tokens = len(ids)
        self.last_prompt_ids = ids.tolist()
        max_tokens = self._check_context(len(ids), params.max_tokens)
        t0 = time.perf_counter()
        embeds, keys = self._prompt_embeddings(ids, prompt.image_bounds, images)
        if clips:
            embeds, keys = self._splice_audio(prompt.searchable_ids(), embeds, keys, clips)
        usage.vision_seconds = time.perf_counter() - t0  # image and audio encoders
        return ids, embeds, keys, usage, max_tokens

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
            slices = [(im.key, s) for im in images for s in range(len(im.strips))]
            for (start, end), (key, s) in zip(bounds, slices, strict=True):
                keys[start:end] = [(key, s, j) for j in range(end - start)]
        return embeds, keys

    def _audio_prompt_parts(self, clips: list[tuple[int, np.ndarray]]):
        """The chat template and the audio placeholder function; audio switches on the TTS template."""
        if not clips:
            return self.chat_template, None
        if self.audio is None:
            raise InputError("this bundle has no audio encoder (it was exported without audio)",
                             param="messages", code="unsupported_audio")
        from .preprocess.audio import audio_placeholder, audio_token_count

        info, tokens = self.audio_info, self.special
        for n, (_, clip) in enumerate(clips):
            if audio_token_count(len(clip), pool_step=info["pool_step"]) == 0:
                raise AudioError(f"audio clip {n} is too short ({len(clip)} samples at 16 kHz); "
                                 "it would give no audio token", param="messages")

        def placeholder(i: int) -> str:
            return audio_placeholder(len(clips[i][1]), info["chunk_input"], audio_start=tokens["audio_start"],
                                     unk=tokens["unk"], audio_end=tokens["audio_end"],
                                     pool_step=info["pool_step"], chunk_length_s=info["chunk_length_s"])
        return self.tts_template, placeholder

    def _splice_audio(self, ids: np.ndarray, embeds: np.ndarray, keys: list, clips):
        """Encode all clips as upstream does (one batch; a message's clips joined) and fill the
        rows between each <|audio_start|> and <|audio_end|>, in order (`ids`: assistant history
        masked out, see Prompt.searchable_ids)."""
        from .preprocess.audio import merge_message_clips

        start_id = self.token_ids[self.special["audio_start"]]
        end_id = self.token_ids[self.special["audio_end"]]
        starts, ends = np.flatnonzero(ids == start_id) + 1, np.flatnonzero(ids == end_id)
        if len(starts) != len(ends) or np.any(ends < starts):
            raise InputError("the prompt's audio bounds are malformed; does a message contain audio tokens "
                             "as text?", param="messages")
        merged = merge_message_clips([c for _, c in clips], [m for m, _ in clips])
        rows = np.concatenate(self.audio.encode_batch(merged))
        bounds = np.stack([starts, ends], axis=1)
        n_positions = int((ends - starts).sum())
        if len(rows) < n_positions:
            raise AudioError(f"the audio encoder gave {len(rows)} embeddings for {n_positions} audio "
                             "positions", param="messages")
        embeds = splice_embeddings(embeds, rows[:n_positions], bounds)
        digest = _clips_digest(merged)
        positions = np.concatenate([np.arange(s, e) for s, e in bounds])
        for j, pos in enumerate(positions):
            keys[pos] = ("audio", digest, j)
        return embeds, keys

    def _stream_text(self, tokens, params: GenerationParams, usage: Usage, stats: StepStats,
                     sampler: Sampler | None = None) -> Iterator[GenerationChunk]:
        """Tokens -> text chunks; with params.logprobs, each token's entry from `sampler.logprobs`."""
        detok = StreamingDetokenizer(self.tokenizer, skip_special_ids=self.hidden_ids)
        stops = StopMatcher(params.stop)
        stop_ids = self.stop_ids | set(params.stop_token_ids)
        finish, n, cut = "length", 0, False
        try:
            for token in tokens:
                n += 1
                # the sampler's record of this token (it appends one per choice when asked)
                logprobs = self.token_logprobs(sampler) if sampler else None
                if token in stop_ids:  # reported in token_ids (as in HF sequences), never as text
                    finish = "stop"
                    yield GenerationChunk(token_ids=[token])
                    break
                text, stopped = stops.feed(detok.add(token))
                yield GenerationChunk(text=text, token_ids=[token], logprobs=logprobs)
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
        usage.draft_tokens, usage.accepted_draft_tokens = stats.draft_tokens, stats.accepted_draft_tokens
        yield GenerationChunk(finish_reason=finish, usage=usage)


def _parts(messages: list[Message]):
    """(message index, part) of every list-content part, checking roles on the way."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InputError(f"messages[{i}]: role must be one of {ROLES}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    yield i, part


def _visual_parts(messages: list[Message]) -> list:
    """(image, max slices or None) in prompt order; video frames count as images of at most 2 slices.
    An image given as a path, URL, data URI or base64 string is loaded here."""
    out = []
    for i, part in _parts(messages):
        where = f"messages[{i}]"
        if part.get("type") == "image":
            out.append((_image(part.get("image"), where), _max_slices(part.get("max_slices"), where)))
        elif part.get("type") == "video":
            limit = _max_slices(part.get("max_slices", VIDEO_MAX_SLICES), where)
            out.extend((_image(frame, where), limit) for frame in part.get("frames") or ())
    return out


def _image(image, where: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, str | Path):
        return load_image(str(image))
    raise InputError(f"{where}: an image must be a PIL image, a path, a URL, a data URI or base64 text, "
                     f"not {type(image).__name__}", param=where)


def _max_slices(value, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{where}: max_slices must be an integer >= 1, got {value!r}", param=where)
    return value


def _audio_parts(messages: list[Message]) -> list[tuple[int, np.ndarray]]:
    """(message index, 16 kHz float32 samples) of every audio clip, in prompt order."""
    return [(i, np.asarray(part["audio"], dtype=np.float32)) for i, part in _parts(messages)
            if part.get("type") == "audio"]


def _clips_digest(clips: list[np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in clips:
        h.update(np.ascontiguousarray(c, dtype=np.float32).tobytes())
        h.update(b"|")
    return h.hexdigest()
