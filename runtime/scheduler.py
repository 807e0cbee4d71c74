"""Continuous batching: up to N requests generate together, one decoder call per step for all of them.

On a CPU a decode step is bound by reading the weights, and one read serves every sequence in the
batch, so N sequences decode in little more than one's time. Each step of `Scheduler.step`:

    drop cancelled requests -> admit waiting ones into free slots -> one prefill chunk (the oldest
    prompt still prefilling) -> one decode step for every slot that has a token to feed -> stream

A request joins between steps and leaves as soon as it ends; a long prompt is prefilled a chunk per
step, so the others keep decoding meanwhile. Each slot is a row of the batched KV buffer
(batch_decoder.py) and keeps what it last held: a request goes to the free slot whose cache shares
the longest prefix with its prompt (a user's next turn finds its conversation warm), else to the
least recently used one. Each request has its own sampler (seed), stop strings and stop ids.
Prompt lookup (`lookup`) runs while a request is alone in the scheduler: its step then verifies a
draft through the slot's one-sequence decoder, as the pipeline's own loop does (runtime/generate.py);
once another request is in a slot, every slot feeds one token per step again. The draft's positions
live in the slot's cache, so nothing moves when the batch forms.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .generate import DraftLength, next_draft
from .stopping import StopMatcher
from .tokenizer import StreamingDetokenizer
from .types import GenerationChunk, GenerationParams, Message, Usage

PREFILL_CHUNK = 64  # prompt positions per step while others decode: bounds how long they wait
SOLO_PREFILL_CHUNK = 512  # ... and while nobody decodes (the single-sequence pipeline's chunk)


def _never() -> bool:
    return False


def _nothing(*_args) -> None:
    return None


@dataclass(eq=False)
class BatchRequest:
    """One generation. The callbacks run on the scheduler's thread: `emit` gets each chunk, `fail` the
    exception that ended it (bad input included), `close` is called once at the end, whatever it was."""

    messages: list[Message]
    params: GenerationParams
    emit: Callable[[GenerationChunk], None]
    fail: Callable[[Exception], None] = _nothing
    close: Callable[[], None] = _nothing
    cancelled: Callable[[], bool] = _never
    start: Callable[[], None] = _nothing  # the request got a slot


@dataclass(eq=False)
class _Reply:
    """A request in a slot: its prompt, sampler, text stream and progress."""

    request: BatchRequest
    slot: int
    ids: np.ndarray
    embeds: np.ndarray
    keys: list
    usage: Usage
    max_tokens: int
    stop_ids: set[int]
    sampler: Callable
    stops: StopMatcher
    detok: StreamingDetokenizer
    position: int  # prompt positions in the cache (prefilled or reused)
    history: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed to the decoder
    produced: int = 0
    first_token_at: float = 0.0
    order: int = 0  # admission order: the oldest prompt is prefilled first
    token_logprobs: Callable | None = None  # Pipeline.token_logprobs of this reply's sampler
    draft_length: DraftLength | None = None  # with params.lookup > 0

    @property
    def prefilling(self) -> bool:
        return self.position < len(self.ids)

    def take(self, logits: np.ndarray) -> bool:
        """Sample the next token from logits [V] and stream it; True when the reply has ended."""
        token = self.sampler(logits, np.asarray(self.history, dtype=np.int64), len(self.ids))
        self.history.append(token)
        self.produced += 1
        if self.produced == 1:
            self.first_token_at = time.perf_counter()
        emit = self.request.emit
        logprobs = self.token_logprobs() if self.token_logprobs else None
        if token in self.stop_ids:  # reported in token_ids (as in HF sequences), never as text
            emit(GenerationChunk(token_ids=[token]))
            return self._finish("stop", cut=False)
        text, stopped = self.stops.feed(self.detok.add(token))
        emit(GenerationChunk(text=text, token_ids=[token], logprobs=logprobs))
        if stopped:  # the text after a stop string is dropped, held-back text included
            return self._finish("stop", cut=True)
        if self.produced == self.max_tokens:
            return self._finish("length", cut=False)
        self.next_token = token
        return False

    def _finish(self, reason: str, cut: bool) -> bool:
        if not cut:
            tail, _ = self.stops.feed(self.detok.flush())
            tail += self.stops.flush()
            if tail:
                self.request.emit(GenerationChunk(text=tail))
        usage = self.usage
        usage.completion_tokens = self.produced
        usage.decode_seconds = time.perf_counter() - self.first_token_at if self.produced > 1 else 0.0
        self.request.emit(GenerationChunk(finish_reason=reason, usage=usage))
        return True


def choose_slot(prefixes: Sequence[int], last_used: Sequence[int], free: Sequence[int]) -> int:
    """The free slot sharing the longest prefix with the prompt; on a tie (none shares any: 0), the
    least recently used one."""
    return max(free, key=lambda i: (prefixes[i], -last_used[i]))


class Scheduler:
    """Runs BatchRequests on a pipeline loaded with `parallel` > 1. Not thread-safe: one thread calls
    submit and step (the server's worker thread, or `generate_batch`)."""

    def __init__(self, pipeline, prefill_chunk: int = PREFILL_CHUNK):
        if getattr(pipeline, "batch", None) is None:
            raise ValueError("the pipeline was loaded for one sequence at a time (parallel=1)")
        self.pipeline, self.batch, self.prefill_chunk = pipeline, pipeline.batch, prefill_chunk
        self.waiting: deque[BatchRequest] = deque()
        self.replies: list[_Reply | None] = [None] * len(self.batch.caches.slots)
        self.last_used = [0] * len(self.replies)
        self._clock = 0  # counts releases: a slot's last_used says how recently it served

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.replies)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.running > 0

    def submit(self, request: BatchRequest) -> None:
        self.waiting.append(request)

    def step(self) -> None:
        """Admit, prefill one chunk, decode one token for every decoding slot (see the module doc)."""
        self._drop_cancelled()
        self._admit()
        decoding = [r for r in self.replies if r is not None and r.next_token is not None]
        prefilling = [r for r in self.replies if r is not None and r.prefilling]
        if prefilling:
            self._prefill(min(prefilling, key=lambda r: r.order),
                          self.prefill_chunk if decoding else SOLO_PREFILL_CHUNK)
        if len(decoding) == 1 and self.running == 1 and decoding[0].draft_length is not None:
            self._decode_with_lookup(decoding[0])
        elif decoding:
            self._decode(decoding)

    def cancel_all(self) -> None:
        for r in self.replies:
            if r is not None:
                self._release(r)
        while self.waiting:
            self.waiting.popleft().close()

    # -- the parts of a step -------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for r in self.replies:
            if r is not None and r.request.cancelled():
                self._release(r)
        for req in [q for q in self.waiting if q.cancelled()]:
            self.waiting.remove(req)
            req.close()

    def _admit(self) -> None:
        while self.waiting and None in self.replies:
            request = self.waiting.popleft()
            try:
                reply = self._place(request)
            except Exception as e:  # bad input (InputError...) ends this request only
                request.fail(e)
                request.close()
                continue
            self.replies[reply.slot] = reply
            request.start()

    def _place(self, request: BatchRequest) -> _Reply:
        p, params = self.pipeline, request.params
        sampler, stops = p.sampler_for(params), StopMatcher(params.stop)
        ids, embeds, keys, usage, max_tokens = p._prepare(request.messages, params)
        caches = self.batch.caches.slots
        free = [i for i, r in enumerate(self.replies) if r is None]
        prefixes = [c.common_prefix(keys) if params.cache_prompt else 0 for c in caches]
        slot = choose_slot(prefixes, self.last_used, free)
        reuse = min(prefixes[slot], len(keys) - 1)  # at least one position must run to get logits
        caches[slot].truncate(reuse)
        usage.cached_prompt_tokens = reuse
        self._clock += 1
        return _Reply(request, slot, ids, embeds, keys, usage, max_tokens,
                      p.stop_ids | set(params.stop_token_ids), sampler, stops,
                      StreamingDetokenizer(p.tokenizer, skip_special_ids=p.hidden_ids), reuse,
                      history=[int(t) for t in ids], order=self._clock,
                      token_logprobs=lambda: p.token_logprobs(sampler),
                      draft_length=DraftLength(params.lookup) if params.lookup and self.batch.multi_logits else None)

    def _prefill(self, reply: _Reply, chunk: int) -> None:
        t0 = time.perf_counter()
        end = min(reply.position + chunk, len(reply.ids))
        logits = self.batch.prefill(reply.slot, reply.embeds[reply.position:end], reply.keys[reply.position:end])
        reply.position = end
        reply.usage.prefill_seconds += time.perf_counter() - t0
        if not reply.prefilling and reply.take(logits):
            self._release(reply)

    def _decode(self, decoding: list[_Reply]) -> None:
        tokens = np.array([r.next_token for r in decoding], dtype=np.int64)
        rows = self.pipeline.embed(tokens)
        out = self.batch.step({r.slot: (rows[j], int(tokens[j])) for j, r in enumerate(decoding)})
        for r in decoding:
            if r.take(out[r.slot]):
                self._release(r)

    def _decode_with_lookup(self, r: _Reply) -> None:
        """One step for the only request in the scheduler: its next token and a prompt-lookup draft
        through the slot's one-sequence decoder; the rows are sampled in turn while the draft holds
        (generate_tokens' loop, one step of it)."""
        kv = self.batch.caches.slots[r.slot]
        room = min(r.draft_length(), r.max_tokens - r.produced - 1, kv.max_length - kv.length - 1)
        draft = next_draft(r.history, room, r.sampler.draft_allowed)
        if not draft:
            r.draft_length.update(0, 0)
            self._decode([r])
            return
        fed = [r.next_token] + draft
        r.usage.draft_tokens += len(draft)
        rows = self.batch.decoders[r.slot].forward_all(self.pipeline.embed(np.array(fed)), fed)
        for j, row in enumerate(rows):
            ended = r.take(row)
            if not ended and j < len(draft) and r.next_token == draft[j]:
                r.usage.accepted_draft_tokens += 1
                continue  # the next row was computed after this very token: it stays valid
            kv.truncate(kv.length - (len(draft) - j))  # the cache holds draft[j:], which did not happen
            if ended:
                self._release(r)
                return
            break
        r.draft_length.update(len(draft), j)

    def _release(self, reply: _Reply) -> None:
        self.replies[reply.slot] = None
        self._clock += 1
        self.last_used[reply.slot] = self._clock
        reply.request.close()


def generate_batch(pipeline, conversations: Sequence[list[Message]],
                   params: GenerationParams | Sequence[GenerationParams] | None = None
                   ) -> Iterator[tuple[int, GenerationChunk]]:
    """Stream the replies to several conversations as (index, chunk), decoding them together; bad input
    in any of them raises (InputError...). `params`: one for all, or one per conversation."""
    if params is None or isinstance(params, GenerationParams):
        params = [params or GenerationParams()] * len(conversations)
    if len(params) != len(conversations):
        raise ValueError(f"{len(params)} params for {len(conversations)} conversations")
    if pipeline.batch is None:  # loaded for one sequence: one conversation after another
        for i, (messages, p) in enumerate(zip(conversations, params, strict=True)):
            for chunk in pipeline.generate(messages, p):
                yield i, chunk
        return
    scheduler, out, errors = Scheduler(pipeline), deque(), []
    for i, (messages, p) in enumerate(zip(conversations, params, strict=True)):
        scheduler.submit(BatchRequest(messages, p, emit=lambda c, i=i: out.append((i, c)), fail=errors.append))
    try:
        while scheduler.busy:
            scheduler.step()
            if errors:
                raise errors[0]
            while out:
                yield out.popleft()
    finally:
        scheduler.cancel_all()
