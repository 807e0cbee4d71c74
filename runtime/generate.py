"""The decode loop: prefill the new part of the prompt, then one token per step.

`Decoder.forward` runs the decoder graph over S new positions with one IOBinding kept for the life
of the decoder. The KV buffers are bound once as past and present: the graph writes them in place,
on the GPU when the cache lives there. The logits land in one preallocated buffer on the cache's
device. A decode step (S = 1) copies its embedding row and `seqlens_k` into preallocated buffers on
that device. So every address a step touches stays fixed, which is what a CUDA graph replay needs.
Only a prefill chunk binds its embeddings from host memory.
`total_sequence_length` is always a host scalar: GroupQueryAttention reads it on the CPU, and so is
`logits_start` (Slice reads its starts on the CPU): -1, except in a step that verifies draft tokens.

Prompt lookup (`lookup_draft`, `generate_tokens(lookup=N)`): when the last few tokens occurred earlier
in the conversation, the tokens that followed them there are fed as a draft together with the new
token, in one step that returns logits at every fed position. Each position's token is sampled as
usual; while it equals the draft's token the next position's logits stay valid, so one step can
yield several tokens. The first mismatch drops the rest of the draft from the cache. Each token is
drawn as plain decoding draws it (the same random draws in the same order), from the logits of a step
that ran several positions, as a prefill does: in fp32 the same logits up to summation order, so the
same reply. With int8 activations (MatMulNBits at accuracy level 4, the int4 default) a last-bit
difference can round an activation the other way, as in a cached prompt (`cache_prompt`): the logits
stay as accurate, but a greedy reply can part from plain decoding's where two tokens nearly tie.
A step reads the weights once for all its positions: that is the speed-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .kv_cache import KVCache

PREFILL_CHUNK = 512  # bounds the activations of a long prompt; GQA continues from the cache
DECODE_GRAPH_ID = "1"  # ORT's name for the one captured CUDA graph: the S = 1 decode step


class Decoder:
    def __init__(self, session: ort.InferenceSession, io_names: dict[str, str], kv: KVCache,
                 vocab_size: int, *, cuda_graph: bool = False):
        """cuda_graph: the session was created with CUDA graphs on (`create_session(cuda_graph=True)`).
        Decode steps then replay one captured graph, and prefill chunks run without capture."""
        self.session = session
        self.names = io_names
        self.kv = kv
        device = kv.device
        hidden = next(i.shape[-1] for i in session.get_inputs() if i.name == io_names["inputs_embeds"])
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self._step_embeds = alloc((1, 1, hidden), np.float32, device, kv.device_id)
        self._seqlens = alloc((1,), np.int32, device, kv.device_id)
        self._total = alloc((), np.int32, "cpu", 0)
        self._logits = alloc((1, 1, vocab_size), np.float32, device, kv.device_id)
        self.vocab_size = vocab_size
        self._verify_logits = None  # the last verify step's [1, S, V] output, alive while its rows are read
        self._io = session.io_binding()
        kv.bind(self._io)
        self._io.bind_ortvalue_input(io_names["seqlens_k"], self._seqlens)
        self._io.bind_ortvalue_input(io_names["total_sequence_length"], self._total)
        self._io.bind_ortvalue_output(io_names["logits"], self._logits)
        # Bundles exported before prompt lookup have no logits_start input: their graph gives one row.
        inputs = {i.name for i in session.get_inputs()}
        self.multi_logits = io_names.get("logits_start") in inputs
        if self.multi_logits:
            self._logits_start = alloc((1,), np.int64, "cpu", 0)
            self._logits_start.update_inplace(np.array([-1], dtype=np.int64))
            self._io.bind_ortvalue_input(io_names["logits_start"], self._logits_start)
        self._prefill_embeds = None  # the host array bound for a prefill chunk, kept alive while bound
        self._hidden_io = None  # the binding that also fetches hidden_states (forward_hidden), made on first use
        self.cuda_graph = cuda_graph
        self._step_options = self._prefill_options = None
        if cuda_graph:
            self._step_options, self._prefill_options = ort.RunOptions(), ort.RunOptions()
            self._step_options.add_run_config_entry("gpu_graph_id", DECODE_GRAPH_ID)
            self._prefill_options.add_run_config_entry("gpu_graph_id", "-1")  # -1: run, do not capture

    def forward(self, embeds: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """Run embeds [S, D] at the positions after the cache; record `keys`; return last logits [V].

        On the CPU the logits are a view of a buffer the next call overwrites: copy them to keep them.
        """
        self._run(embeds, keys)
        return self._logits.numpy()[0, 0]

    def forward_all(self, embeds: np.ndarray, keys: Sequence[Hashable]) -> np.ndarray:
        """As `forward`, but return the logits of every position run, [S, V] (a draft's verify step)."""
        s = embeds.shape[0]
        if s == 1:
            return self.forward(embeds, keys)[None]
        if not self.multi_logits:
            raise ValueError("this bundle's decoder returns one position's logits (re-export it for prompt lookup)")
        # A fresh buffer per verify step (S x V floats: 2.4 MB for S = 4 at 7B), not one kept per S:
        # draft lengths vary, and buffers for every S up to 17 would hold ~90 MB.
        out = self._verify_logits = ort.OrtValue.ortvalue_from_shape_and_type(
            (1, s, self.vocab_size), np.float32, self.kv.device, self.kv.device_id)
        self._logits_start.update_inplace(np.array([-s], dtype=np.int64))
        self._io.bind_ortvalue_output(self.names["logits"], out)
        try:
            self._run(embeds, keys)
        finally:  # back to the one-row binding a decode step (and a captured CUDA graph) uses
            self._logits_start.update_inplace(np.array([-1], dtype=np.int64))
            self._io.bind_ortvalue_output(self.names["logits"], self._logits)
        return out.numpy()[0]

    @property
    def has_hidden_states(self) -> bool:
        """Whether the graph outputs its final hidden states (bundles exported before speech do not)."""
        name = self.names.get("hidden_states")
        return name is not None and name in {o.name for o in self.session.get_outputs()}

    def forward_hidden(self, embeds: np.ndarray, keys: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
        """As `forward`, also returning the final hidden states of every position run, [S, D] (a copy).

        A second binding holds the same buffers plus the hidden-state output, so a decode step (and a
        captured CUDA graph) keeps its own binding untouched."""
        if not self.has_hidden_states:
            raise ValueError("this bundle's decoder has no hidden_states output (re-export it for speech)")
        s, hidden = embeds.shape[0], self._step_embeds.shape()[-1]
        if self._hidden_io is None:
            io = self.session.io_binding()
            self.kv.bind(io)
            io.bind_ortvalue_input(self.names["seqlens_k"], self._seqlens)
            io.bind_ortvalue_input(self.names["total_sequence_length"], self._total)
            if self.multi_logits:
                io.bind_ortvalue_input(self.names["logits_start"], self._logits_start)
            io.bind_ortvalue_output(self.names["logits"], self._logits)
            self._hidden_io = io
        out = ort.OrtValue.ortvalue_from_shape_and_type((1, s, hidden), np.float32, "cpu", 0)
        self._hidden_io.bind_ortvalue_output(self.names["hidden_states"], out)
        self._run(embeds, keys, self._hidden_io)
        return self._logits.numpy()[0, 0], out.numpy()[0].copy()

    def _run(self, embeds: np.ndarray, keys: Sequence[Hashable], io: ort.IOBinding | None = None) -> None:
        io = io or self._io
        s = embeds.shape[0]
        total = self.kv.length + s
        if total > self.kv.max_length:
            raise ValueError(f"sequence of {total} positions exceeds the KV cache ({self.kv.max_length})")
        rows = np.ascontiguousarray(embeds[None], dtype=np.float32)
        if s == 1:
            self._step_embeds.update_inplace(rows)
            io.bind_ortvalue_input(self.names["inputs_embeds"], self._step_embeds)
            options = self._step_options
        else:
            self._prefill_embeds = rows
            io.bind_cpu_input(self.names["inputs_embeds"], rows)
            options = self._prefill_options
        self._seqlens.update_inplace(np.array([total - 1], dtype=np.int32))
        # A captured step must not depend on a host value that changes: GroupQueryAttention then reads
        # the real length from seqlens_k on the device, and total_sequence_length is the buffer's.
        host_total = self.kv.max_length if (s == 1 and self.cuda_graph) else total
        self._total.update_inplace(np.array(host_total, dtype=np.int32))
        self.session.run_with_iobinding(io, options)
        self.kv.append(keys)

    def prefill(self, embeds: np.ndarray, keys: Sequence[Hashable], chunk: int = PREFILL_CHUNK) -> np.ndarray:
        """Run a prompt's new part in chunks; returns the logits of its last position."""
        return self.prefill_hidden(embeds, keys, None, chunk)[0]

    def prefill_hidden(self, embeds: np.ndarray, keys: Sequence[Hashable], hidden_at: int | None,
                       chunk: int = PREFILL_CHUNK) -> tuple[np.ndarray, np.ndarray | None]:
        """As `prefill`, also returning the final hidden state at index `hidden_at` of `embeds` [D]
        (None when `hidden_at` is None)."""
        logits, hidden = None, None
        for start in range(0, embeds.shape[0], chunk):
            part, part_keys = embeds[start:start + chunk], keys[start:start + chunk]
            if hidden_at is not None and start <= hidden_at < start + len(part):
                logits, rows = self.forward_hidden(part, part_keys)
                hidden = rows[hidden_at - start]
            else:
                logits = self.forward(part, part_keys)
        return logits, hidden


@dataclass
class StepStats:
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cached_tokens: int = 0
    draft_tokens: int = 0  # prompt lookup: draft tokens fed to the decoder
    accepted_draft_tokens: int = 0  # ... and those the sampler then chose
    hidden_state: np.ndarray | None = None  # [D]: the final hidden state prefill_prompt was asked for


LOOKUP_NGRAMS = (3, 2)  # match the last 3 tokens, else the last 2; one token alone drafts too often in vain
# What one more position in a step costs, as a share of a one-position step: 0.2 at 1.5B and 0.3 at
# 7B on 2 cores (benchmarks/lookup.py), where an extra position is compute (~22 ms at 7B) on top of a
# step that reads all the weights (~80 ms). A constant, not timed at run time: the draft lengths, and
# with int8 activations the reply, must not depend on how busy the machine is.
LOOKUP_POSITION_COST = 0.25


class DraftLength:
    """How many draft tokens to feed: the length with the most tokens per unit of step time, from a
    running estimate of the chance that a draft token is kept and what a position costs.

    With d draft tokens each kept with chance p, a step yields (1 - p^(d+1)) / (1 - p) tokens on
    average and costs 1 + c·d one-position steps. A miss lowers p, a kept token raises it; while no
    draft is fed p drifts back toward even odds, so after a run of misses drafting is retried now
    and then."""

    def __init__(self, limit: int, prior: float = 0.5, cost: float = LOOKUP_POSITION_COST):
        self.limit, self.p_kept, self.cost = limit, prior, cost

    def __call__(self) -> int:
        best, best_rate, tokens, p = 0, 1.0, 1.0, 1.0
        for d in range(1, self.limit + 1):
            p *= self.p_kept
            tokens += p
            rate = tokens / (1 + self.cost * d)
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def update(self, fed: int, kept: int) -> None:
        if not fed:
            self.p_kept += 0.01 * (0.5 - self.p_kept)
            return
        for i in range(min(kept + 1, fed)):  # the tokens checked: the kept ones and the first miss
            self.p_kept = 0.9 * self.p_kept + 0.1 * (i < kept)


def lookup_draft(history: np.ndarray, max_tokens: int, ngrams: Sequence[int] = LOOKUP_NGRAMS) -> np.ndarray:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n tokens of
    `history` (the longest n in `ngrams` that occurs), at most `max_tokens` of them; empty if none."""
    h = np.asarray(history, dtype=np.int64)
    if max_tokens < 1:
        return h[:0]
    for n in ngrams:
        if len(h) <= n:
            continue
        # windows that start before the tail itself and leave at least one token after them
        windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
        hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return h[start:start + max_tokens].copy()
    return h[:0]


def prefill_prompt(decoder: Decoder, prompt_embeds: np.ndarray, prompt_keys: Sequence[Hashable],
                   stats: StepStats, reuse_prefix: bool = True, hidden_at: int | None = None) -> np.ndarray:
    """Run the part of the prompt the cache does not hold (all of it when `reuse_prefix` is False);
    return the logits of its last position (a view the next decoder call overwrites).

    hidden_at: a prompt position whose final hidden state is wanted (speech: the `<|spk|>` token); it
    is run even when the cache holds it, and its state lands in `stats.hidden_state`."""
    kv = decoder.kv
    reuse = kv.common_prefix(prompt_keys) if reuse_prefix else 0
    reuse = min(reuse, len(prompt_keys) - 1)  # at least one position must run to get logits
    if hidden_at is not None:
        reuse = min(reuse, hidden_at)
    kv.truncate(reuse)
    stats.cached_tokens = reuse
    t0 = time.perf_counter()
    if hidden_at is None:
        logits = decoder.prefill(prompt_embeds[reuse:], prompt_keys[reuse:])
    else:
        logits, stats.hidden_state = decoder.prefill_hidden(prompt_embeds[reuse:], prompt_keys[reuse:],
                                                            hidden_at - reuse)
    stats.prefill_seconds = time.perf_counter() - t0
    return logits


def next_draft(history: Sequence[int], room: int,
               draft_allowed: Callable[[list[int]], int] | None = None) -> list[int]:
    """Prompt lookup's draft for the next step: at most `room` tokens, cut to what `draft_allowed`
    (a grammar's verdict) allows; empty when there is no room or nothing matches."""
    draft = [int(t) for t in lookup_draft(np.asarray(history, dtype=np.int64), room)] if room > 0 else []
    if draft and draft_allowed is not None:
        draft = draft[:draft_allowed(draft)]
    return draft


def generate_tokens(decoder: Decoder, embed: Callable[[np.ndarray], np.ndarray],
                    prompt_embeds: np.ndarray, prompt_keys: Sequence[Hashable], prompt_ids: np.ndarray,
                    sample: Callable[[np.ndarray, np.ndarray, int], int], max_tokens: int,
                    stop_ids: set[int], stats: StepStats, reuse_prefix: bool = True,
                    lookup: int = 0, hidden_at: int | None = None,
                    draft_allowed: Callable[[list[int]], int] | None = None) -> Iterator[int]:
    """Yield generated token ids (a stop id is yielded too, then the loop ends).

    Reuses the longest cached prefix of the prompt unless `reuse_prefix` is False; `lookup` > 0 feeds
    up to that many prompt-lookup draft tokens with each step (see the module docstring), cut to the
    first `draft_allowed(draft)` of them when given (a grammar's verdict: `Sampler.draft_allowed`);
    the caller closes the generator to cancel.
    """
    logits = prefill_prompt(decoder, prompt_embeds, prompt_keys, stats, reuse_prefix, hidden_at)
    kv = decoder.kv
    history = list(np.asarray(prompt_ids, dtype=np.int64))
    n_prompt = len(history)
    rows, draft = [logits], []  # logits to sample from in turn; the draft tokens fed after the first
    draft_len = DraftLength(lookup)  # with lookup 0 it always says 0: no draft is looked for
    produced, t0 = 0, time.perf_counter()
    while True:
        for j, row in enumerate(rows):
            token = sample(row, np.asarray(history, dtype=np.int64), n_prompt)
            history.append(token)
            produced += 1
            if produced > 1:
                stats.decode_seconds = time.perf_counter() - t0
            yield token
            if token in stop_ids or produced == max_tokens:
                return
            if j < len(draft) and token == draft[j]:
                stats.accepted_draft_tokens += 1
                continue  # the next row was computed after this very token: it stays valid
            kv.truncate(kv.length - (len(draft) - j))  # the cache holds draft[j:], which did not happen
            break
        draft_len.update(len(draft), j)  # the loop broke at row j: the draft's first j tokens were kept
        if produced == 1:
            t0 = time.perf_counter()  # decode speed counts the steps after the first token
        # Room: the cache keeps one position free for the token after this step, and the draft never
        # runs past max_tokens.
        room = min(draft_len(), max_tokens - produced - 1, kv.max_length - kv.length - 1)
        draft = next_draft(history, room, draft_allowed)
        fed = [token] + draft
        stats.draft_tokens += len(draft)
        if draft:
            rows = decoder.forward_all(embed(np.array(fed)), fed)
        else:
            rows = [decoder.forward(embed(np.array([token])), [int(token)])]
