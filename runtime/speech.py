"""Speech output: the reply text and the LLM's speaker condition -> 24 kHz audio, chunk by chunk.

Upstream's path (modeling_minicpmo.py: `_generate_mel_spec`, `ConditionalChatTTS.generate`,
`gen_logits`, `_generate_mel_spec_audio_streaming`, `_linear_overlap_add2_wav`), top to bottom:

    final hidden state at <|spk|>  -> speaker embedding (tts.projector, L2-normalized)
    reply text (up to <|tts_eos|>) -> ChatTTS ids [Stts][spk_emb]text[Etts][PAD]...[Ptts], the text
                                      cut to the 300-token reserve as upstream cuts it
    prefill the text, then one step per code position: 4 code streams sampled from [4, 626]
        logits (per-stream temperature; after the first step the repetition penalty, top-p, top-k);
        code 625 in any stream ends the reply (that step's codes are dropped); at most max_codes
    every 25 codes: those codes (and the 4 before them, for context) -> DVAE mel -> Vocos audio,
        cross-faded (triangular weights) into the previous chunk over the 4 shared codes' samples

Streaming: each chunk's audio is handed out as soon as it is decoded, but for its last 4 codes'
samples, which wait for the next chunk's cross-fade; so the first audio arrives after one chunk
(25 codes, ~0.45 s of speech), long before a long reply's last code, and the samples are upstream's.
The model is any object with TTSModel's methods (runtime/tts_model.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)
SAMPLE_RATE = 24_000
NUM_CODES = 626  # per stream; the last one ends the reply


class SpeechModel(Protocol):
    """What the loop needs from the TTS graphs (runtime/tts_model.py provides it)."""

    def speaker_embedding(self, hidden: np.ndarray) -> np.ndarray: ...
    def text_input(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...
    def prefill(self, text_ids: np.ndarray, spk_emb: np.ndarray, mask: np.ndarray | None = None) -> None: ...
    def step(self, codes: np.ndarray | None) -> np.ndarray: ...
    def codes_to_mel(self, codes: np.ndarray) -> np.ndarray: ...
    def mel_to_audio(self, mel: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SpeechParams:
    """Upstream's settings (ConditionalChatTTS.generate and gen_logits defaults, chat's calls)."""

    temperatures: tuple[float, ...] = (0.1, 0.3, 0.1, 0.3)  # one per code stream
    top_p: float = 0.7
    top_k: int = 20
    min_tokens_to_keep: int = 3  # gen_logits: TopP/TopKLogitsWarper(min_tokens_to_keep=3)
    repetition_penalty: float = 1.0  # 1 = off, upstream's default
    penalty_window: int = 16  # CustomRepetitionPenaltyLogitsProcessorRepeat's past_window
    end_code: int = 625
    chunk_codes: int = 25  # output_chunk_size: codes per generate() call and per audio chunk
    # generate(min_new_token=10) forbids the end code in the first 10 steps of every call, i.e. of
    # every 25-code chunk; kept as upstream has it.
    min_codes_per_chunk: int = 10
    max_codes: int = 2048
    context_codes: int = 4  # codes decoded again before each chunk, the cross-fade's span
    # True: prefill the text condition in upstream's chunks (12, then 10 positions per run); False: in
    # one run (see prefill_condition)
    prefill_in_chunks: bool = False
    seed: int | None = None

    @classmethod
    def from_manifest(cls, speech: dict, **overrides) -> SpeechParams:
        """The bundle's sampling defaults (manifest "speech" section), then `overrides`."""
        sampling = speech.get("sampling", {})
        base = dict(temperatures=tuple(sampling.get("temperature", cls.temperatures)),
                    top_p=sampling.get("top_p", cls.top_p), top_k=sampling.get("top_k", cls.top_k),
                    repetition_penalty=sampling.get("repetition_penalty", cls.repetition_penalty),
                    penalty_window=sampling.get("repetition_window", cls.penalty_window),
                    min_tokens_to_keep=sampling.get("min_tokens_to_keep", cls.min_tokens_to_keep),
                    end_code=speech.get("eos_code", cls.end_code),
                    chunk_codes=speech.get("output_chunk_size", cls.chunk_codes),
                    min_codes_per_chunk=speech.get("min_new_codes", cls.min_codes_per_chunk),
                    max_codes=speech.get("max_new_codes", cls.max_codes))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def check(self) -> None:
        from .errors import InputError

        if len(self.temperatures) < 1 or min(self.temperatures) <= 0:
            raise InputError("speech temperatures must be positive", param="audio.temperatures")
        if not 0 < self.top_p <= 1:
            raise InputError(f"speech top_p must be in (0, 1], got {self.top_p}", param="audio.top_p")
        if self.top_k < 0 or self.repetition_penalty <= 0 or self.chunk_codes < 1 or self.max_codes < 1:
            raise InputError("speech top_k must be >= 0, repetition_penalty > 0, chunk_codes and max_codes >= 1",
                             param="audio")


@dataclass(frozen=True)
class SpeechRequest:
    """Speak the reply: in which voice, and any sampling settings that differ from the bundle's."""

    voice: str = "default"  # a voice the bundle carries (runtime/voices.py)
    reference: np.ndarray | None = None  # or a reference clip, 16 kHz samples (overrides voice)
    mode: str = "audio_assistant"  # upstream get_sys_prompt's mode for a reference clip
    language: str = "en"
    seed: int | None = None  # None: the text's seed (GenerationParams.seed)
    temperatures: tuple[float, ...] | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_codes: int | None = None

    def overrides(self) -> dict:
        return {k: getattr(self, k) for k in ("temperatures", "top_p", "top_k", "repetition_penalty", "max_codes")
                if getattr(self, k) is not None}


@dataclass
class SpeechStats:
    codes: int = 0
    seconds: float = 0.0  # compute: prefill, steps, DVAE, Vocos
    first_audio_seconds: float | None = None  # from the start to the first chunk handed out
    finished: bool = False  # the end code came (False: max_codes)
    truncated_text: bool = False
    chunks: list[int] = field(default_factory=list)  # samples per chunk handed out

    @property
    def audio_seconds(self) -> float:
        return sum(self.chunks) / SAMPLE_RATE


# -- sampling (numpy versions of the HF warpers upstream uses) -------------------------------------

def repetition_penalty(logits: np.ndarray, history: np.ndarray, penalty: float, window: int) -> np.ndarray:
    """CustomRepetitionPenaltyLogitsProcessorRepeat: each code seen n times in the last `window` steps
    of its stream divides a positive logit by penalty**n (multiplies a negative one)."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    recent = history[-window:]  # [n, streams]
    freq = np.zeros_like(logits)
    for s in range(logits.shape[0]):
        freq[s] = np.bincount(recent[:, s], minlength=logits.shape[1])[:logits.shape[1]]
    alpha = np.power(penalty, freq)
    return np.where(logits < 0, logits * alpha, logits / alpha)


def top_p_filter(logits: np.ndarray, top_p: float, keep: int) -> np.ndarray:
    """TopPLogitsWarper: drop the least likely codes whose cumulative probability is <= 1 - top_p."""
    if top_p >= 1.0:
        return logits
    order = np.argsort(logits, axis=-1, kind="stable")  # ascending, as HF sorts
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    cum = np.cumsum(softmax(sorted_logits), axis=-1)
    remove = cum <= 1 - top_p
    remove[:, -keep:] = False
    out = logits.copy()
    np.put_along_axis(out, order, np.where(remove, -np.inf, sorted_logits), axis=-1)
    return out


def top_k_filter(logits: np.ndarray, top_k: int, keep: int) -> np.ndarray:
    """TopKLogitsWarper: keep the codes at least as likely as the k-th (k >= keep); 0 = off."""
    if top_k <= 0:
        return logits
    k = min(max(top_k, keep), logits.shape[-1])
    kth = -np.sort(-logits, axis=-1)[:, k - 1:k]
    return np.where(logits < kth, -np.inf, logits)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_step(logits: np.ndarray, history: np.ndarray, params: SpeechParams, rng: np.random.Generator,
                first: bool, block_end: bool) -> np.ndarray:
    """One code per stream from logits [streams, codes]. The first step (fed [Ptts]'s audio_bos)
    skips the penalty and the warpers, as upstream's `audio_bos` branch does."""
    x = logits.astype(np.float64) / np.asarray(params.temperatures, dtype=np.float64)[:, None]
    if not first:
        x = repetition_penalty(x, history, params.repetition_penalty, params.penalty_window)
        x = top_p_filter(x, params.top_p, params.min_tokens_to_keep)
        x = top_k_filter(x, params.top_k, params.min_tokens_to_keep)
    if block_end:
        x[:, params.end_code] = -np.inf
    probs = softmax(x)
    draws = rng.random(probs.shape[0])
    cum = np.cumsum(probs, axis=-1)
    codes = (cum < draws[:, None] * cum[:, -1:]).sum(axis=-1)
    return np.minimum(codes, probs.shape[1] - 1).astype(np.int64)


# -- the loop ------------------------------------------------------------------------------------

def prefill_condition(model: SpeechModel, ids: np.ndarray, spk_emb: np.ndarray, mask: np.ndarray,
                      in_chunks: bool) -> None:
    """Run the condition's first len(ids) - 1 positions into the model's cache.

    Upstream prefills 12, then 10 text positions at a time because its streaming text may still be
    arriving. Here the reply's text is whole, and a text position attends only to the text before it
    (a causal mask, no audio), so one run over all of them fills the same cache, up to summation
    order, reading the weights once instead of 30 times."""
    if in_chunks or not hasattr(model, "prefill_text"):
        model.prefill(ids, spk_emb, mask)
        return
    model.truncate(0)
    model.set_text_mask(mask)
    model.prefill_text(np.asarray(ids)[:-1], 0, spk_emb)


def generate_codes(model: SpeechModel, hidden: np.ndarray, text: str, params: SpeechParams,
                   stats: SpeechStats, text_end_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield the sampled codes in chunks of `chunk_codes` ([n, streams] int64; the last may be shorter).
    `text_end_id`: the [Etts] id, whose absence from the condition means the text was cut."""
    rng = np.random.default_rng(params.seed)
    ids, mask = model.text_input(text)
    if text_end_id is not None and text_end_id not in np.asarray(ids):
        # upstream prepare_tts_text keeps a long reply's first tokens (no [Etts] then)
        stats.truncated_text = True
        log.warning("the reply is longer than the speech text reserve (%d condition positions): only its "
                    "start is spoken", len(ids))
    prefill_condition(model, ids, model.speaker_embedding(hidden), mask, params.prefill_in_chunks)
    history = np.zeros((0, len(params.temperatures)), dtype=np.int64)
    chunk: list[np.ndarray] = []
    previous = None
    while len(history) < params.max_codes:
        step_in_chunk = len(history) % params.chunk_codes
        logits = model.step(previous)
        codes = sample_step(logits, history, params, rng, first=previous is None,
                            block_end=step_in_chunk < params.min_codes_per_chunk)
        if (codes == params.end_code).any():
            stats.finished = True
            break
        history = np.concatenate([history, codes[None]])
        chunk.append(codes)
        previous = codes
        if len(chunk) == params.chunk_codes:
            yield np.stack(chunk)
            chunk = []
    stats.codes = len(history)
    if chunk:
        yield np.stack(chunk)


def overlap_add(previous: np.ndarray, new: np.ndarray, overlap: int,
                span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's `_linear_overlap_add2_wav`: cross-fade `new` into the last `overlap` samples of
    `previous` with triangular weights; returns (`previous` faded, the rest of `new`). The weights'
    slope depends on max(len(previous), len(new)) upstream; `span` gives that length when `previous`
    is only the tail of upstream's (the samples before the tail keep their values either way)."""
    n0, n1 = len(previous), len(new)
    total = n0 + n1 - overlap
    t = np.linspace(0.0, 1.0, (span or max(n0, n1)) + overlap + 2, dtype=np.float64)[1:-1]
    weight = 0.5 - np.abs(t - 0.5)
    out, norm = np.zeros(total), np.zeros(total)
    out[:n0] += weight[-n0:] * previous
    norm[:n0] += weight[-n0:]
    start = n0 - overlap
    out[start:start + n1] += weight[:n1] * new
    norm[start:start + n1] += weight[:n1]
    out /= norm
    return out[:n0].astype(np.float32), out[n0:].astype(np.float32)


def speak(model: SpeechModel, hidden: np.ndarray, text: str, params: SpeechParams,
          stats: SpeechStats | None = None, text_end_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield 24 kHz float32 audio chunks for one reply (see the module docstring).

    Upstream holds a whole chunk until the next one is cross-faded into it; only its last
    `context_codes` codes' samples change in that fade, so those alone are held here and the rest is
    handed out at once: the same samples, the first of them after one chunk instead of two."""
    stats = stats if stats is not None else SpeechStats()
    t0 = start = time.perf_counter()
    busy = 0.0  # compute time, excluding the time the consumer holds each chunk
    decoded = np.zeros((0, len(params.temperatures)), dtype=np.int64)
    held, upstream_len = None, 0  # the tail still to be faded; the length of upstream's held chunk
    for codes in generate_codes(model, hidden, text, params, stats, text_end_id):
        context = min(params.context_codes, len(decoded))
        decoded = np.concatenate([decoded, codes])
        wav = np.asarray(model.mel_to_audio(model.codes_to_mel(decoded[len(decoded) - len(codes) - context:])),
                         dtype=np.float32).reshape(-1)
        per_code = len(wav) // (len(codes) + context)
        if held is None:
            ready, upstream_len = wav, len(wav)
        else:
            faded, rest = overlap_add(held, wav, context * per_code, span=max(upstream_len, len(wav)))
            ready, upstream_len = np.concatenate([faded, rest]), len(rest)
        keep = min(params.context_codes * per_code, len(ready))
        ready, held = ready[:len(ready) - keep], ready[len(ready) - keep:]
        busy += time.perf_counter() - start
        if len(ready):
            yield _hand_out(ready, stats, t0)
        start = time.perf_counter()
    busy += time.perf_counter() - start
    stats.seconds = busy
    if held is not None and len(held):
        yield _hand_out(held, stats, t0)


def _hand_out(wav: np.ndarray, stats: SpeechStats, t0: float) -> np.ndarray:
    stats.chunks.append(len(wav))
    if stats.first_audio_seconds is None:
        stats.first_audio_seconds = time.perf_counter() - t0
    return wav
