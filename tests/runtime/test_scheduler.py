"""Continuous batching on a real fp32 bundle: batched steps against one-sequence steps, replies decoded
together against each alone (greedy, seeded, stop strings), slots chosen by shared prefix, requests
joining and leaving between steps, and chunked prefill interleaved with the others' decoding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from minicpmo.runtime import generate
from minicpmo.runtime import scheduler as sched
from minicpmo.runtime.errors import InputError
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.scheduler import BatchRequest, Scheduler, choose_slot
from minicpmo.runtime.types import GenerationParams

CONTEXT = 512


@pytest.fixture(scope="module")
def single(fp32_bundle) -> Pipeline:
    return Pipeline.load(fp32_bundle, context_length=CONTEXT)


@pytest.fixture(scope="module")
def batched(fp32_bundle) -> Pipeline:
    return Pipeline.load(fp32_bundle, context_length=CONTEXT, parallel=3)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def alone(pipeline: Pipeline, messages, params: GenerationParams) -> tuple[list[int], str, str]:
    tokens, text, finish = [], "", None
    for c in pipeline.generate(messages, params):
        tokens += c.token_ids
        text += c.text
        finish = c.finish_reason or finish
    return tokens, text, finish


def together(pipeline: Pipeline, conversations, params) -> list[tuple[list[int], str, str]]:
    out = [([], "", None) for _ in conversations]
    for i, c in pipeline.generate_batch(conversations, params):
        tokens, text, finish = out[i]
        out[i] = (tokens + c.token_ids, text + c.text, c.finish_reason or finish)
    return out


PROMPTS = ["Describe a lighthouse.", "Count: " + "one two three " * 40, "Hi", "Name three rivers in Europe.",
           "What is a prime number?"]


def test_a_batched_step_gives_each_sequence_the_logits_it_gets_alone(single, batched):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, single.embed.vocab_size, n) for n in (7, 40, 19)]
    want = []
    for ids in prompts:
        single.kv.reset()
        first = single.decoder.prefill(single.embed(ids), [int(t) for t in ids]).copy()
        step = single.decoder.forward(single.embed(np.array([7])), [7]).copy()
        want.append((first, step))
    bd = batched.batch
    for kv in bd.caches.slots:
        kv.reset()
    firsts = [bd.prefill(i, batched.embed(ids), [int(t) for t in ids]).copy() for i, ids in enumerate(prompts)]
    steps = bd.step({i: (batched.embed(np.array([7]))[0], 7) for i in range(3)})
    for i, (first, step) in enumerate(want):
        np.testing.assert_allclose(firsts[i], first, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(steps[i], step, rtol=1e-4, atol=1e-4)
        assert bd.caches.slots[i].length == len(prompts[i]) + 1


def test_greedy_replies_decoded_together_are_the_replies_alone(single, batched):
    params = GenerationParams(max_tokens=10, cache_prompt=False)
    want = [alone(single, chat(p), params) for p in PROMPTS]
    # five conversations through three slots: two join when the first ones leave
    got = together(batched, [chat(p) for p in PROMPTS], params)
    assert got == want
    assert all(finish == "length" for _, _, finish in got)


def test_seeds_and_stop_strings_are_per_request(single, batched):
    sampled = [GenerationParams(max_tokens=12, temperature=1.0, seed=s, cache_prompt=False) for s in (1, 2, 3)]
    want = [alone(single, chat("Tell me a story."), p) for p in sampled]
    assert len({tuple(t) for t, _, _ in want}) > 1  # different seeds, different replies
    assert together(batched, [chat("Tell me a story.")] * 3, sampled) == want
    # a stop string taken from one reply's middle ends that reply there, and only that one
    text = want[0][1]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    with_stop = [replace(sampled[0], stop=(stop,)), sampled[1]]
    got = together(batched, [chat("Tell me a story.")] * 2, with_stop)
    assert got[0] == alone(single, chat("Tell me a story."), with_stop[0])
    assert got[0][2] == "stop" and stop not in got[0][1] and got[0][1] == text[:text.index(stop)]
    assert got[1] == want[1]


def test_choose_slot_prefers_the_longest_shared_prefix_then_the_least_recently_used():
    assert choose_slot([0, 5, 3], [1, 2, 3], free=[0, 1, 2]) == 1
    assert choose_slot([0, 5, 3], [1, 2, 3], free=[0, 2]) == 2
    assert choose_slot([0, 0, 0], [4, 2, 3], free=[0, 1, 2]) == 1  # nothing shared: least recently used
    assert choose_slot([0, 0, 0], [4, 2, 3], free=[0, 2]) == 2


def run(scheduler: Scheduler, requests) -> None:
    for r in requests:
        scheduler.submit(r)
    while scheduler.busy:
        scheduler.step()


def test_a_second_turn_goes_to_the_slot_that_holds_its_conversation(batched):
    events: list = []
    scheduler = Scheduler(batched)
    params = GenerationParams(max_tokens=4)
    first = [chat("First user, first turn."), chat("Second user, first turn, a bit longer."),
             chat("Third user.")]
    run(scheduler, [BatchRequest(m, params, emit=lambda c, i=i: events.append((i, c))) for i, m in enumerate(first)])
    slot = slot_holding(batched, first[1])
    second = first[1] + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And then?"}]
    usage = []
    req = BatchRequest(second, params, emit=lambda c: usage.append(c.usage) if c.usage else None)
    scheduler.submit(req)
    scheduler.step()
    assert scheduler.replies[slot] is not None and scheduler.replies[slot].request is req
    run(scheduler, [])
    n_first = len(batched._prepare(first[1], params)[2])
    assert usage[0].cached_prompt_tokens >= n_first - 5  # the first turn's prompt, up to its closing tokens


def slot_holding(pipeline, messages) -> int:
    """The slot whose cache starts with this conversation's prompt."""
    keys = pipeline._prepare(messages, GenerationParams())[2]
    return next(i for i, kv in enumerate(pipeline.batch.caches.slots) if kv.keys[:len(keys)] == keys)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(batched, monkeypatch):
    monkeypatch.setattr(sched, "SOLO_PREFILL_CHUNK", 512)
    scheduler = Scheduler(batched, prefill_chunk=16)
    tokens = {"short": 0, "long": 0}
    long_text = "Summarise: " + "the quick brown fox jumps over the lazy dog " * 12

    def counter(name):
        return lambda c: tokens.__setitem__(name, tokens[name] + len(c.token_ids))

    scheduler.submit(BatchRequest(chat("Hello"), GenerationParams(max_tokens=40), emit=counter("short")))
    scheduler.step()  # a lone prompt prefills whole and gives its first token
    assert tokens["short"] == 1
    scheduler.submit(BatchRequest(chat(long_text), GenerationParams(max_tokens=2), emit=counter("long")))
    steps = 0
    while tokens["long"] == 0:
        scheduler.step()
        steps += 1
    assert steps >= 5  # > 80 prompt tokens in 16-token chunks
    assert tokens["short"] == 1 + steps  # one token per step all along
    run(scheduler, [])


def test_bad_input_ends_that_request_only_and_cancelled_ones_leave_between_steps(batched):
    scheduler = Scheduler(batched)
    failures, closed, chunks = [], [], []
    cancel = {"now": False}
    good = BatchRequest(chat("Hello"), GenerationParams(max_tokens=30), emit=chunks.append,
                        close=lambda: closed.append("good"), cancelled=lambda: cancel["now"])
    bad = BatchRequest(chat("Hello"), GenerationParams(max_tokens=0), emit=chunks.append, fail=failures.append,
                       close=lambda: closed.append("bad"))
    scheduler.submit(good)
    scheduler.submit(bad)
    scheduler.step()
    assert isinstance(failures[0], InputError) and closed == ["bad"]
    scheduler.step()
    cancel["now"] = True
    scheduler.step()
    assert closed == ["bad", "good"] and not scheduler.busy
    assert len(chunks) == 2 and all(c.finish_reason is None for c in chunks)


def test_generate_batch_without_slots_runs_one_after_another(single):
    params = GenerationParams(max_tokens=3, cache_prompt=False)
    got = together(single, [chat("a"), chat("b")], params)
    assert got == [alone(single, chat(t), params) for t in "ab"]


def test_int8_activations_quantize_each_row_alone(int4_bundle):
    """MatMulNBits at accuracy level 4 quantizes activations per row and block, so a row's int8 values do
    not depend on its batch neighbours: only the float summation order of the batched kernel differs."""
    one = Pipeline.load(int4_bundle, context_length=128)
    many = Pipeline.load(int4_bundle, context_length=128, parallel=4)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, one.embed.vocab_size, n) for n in (5, 31, 12, 20)]
    want = []
    for ids in prompts:
        one.kv.reset()
        one.decoder.prefill(one.embed(ids), [int(t) for t in ids])
        want.append(one.decoder.forward(one.embed(np.array([3])), [3]).copy())
    for i, ids in enumerate(prompts):
        many.batch.prefill(i, many.embed(ids), [int(t) for t in ids])
    got = many.batch.step({i: (many.embed(np.array([3]))[0], 3) for i in range(4)})
    for i, w in enumerate(want):
        # summation order moves logits by ~1e-7 of their scale; rows quantized with a scale shared across the
        # batch (int8 steps of 1/127 of the batch's largest activation) would move them by orders more
        np.testing.assert_allclose(got[i], w, rtol=0, atol=1e-4 * float(np.abs(w).max()))


def _scripted_drafts(monkeypatch, reply: list[int], n_prompt: int, wrong_at: int | None):
    """lookup_draft replaced by the reply's own next tokens (the one at `wrong_at` of each draft
    changed): what the verify step keeps must then follow from the draft alone."""
    calls = []

    def draft(history, max_tokens, ngrams=None):
        done = len(history) - n_prompt
        d = list(reply[done:done + max_tokens])
        if wrong_at is not None and wrong_at < len(d):
            d[wrong_at] = (d[wrong_at] + 1) % 1000
        calls.append(len(d))
        return np.array(d, dtype=np.int64)

    monkeypatch.setattr(generate, "lookup_draft", draft)
    return calls


def _usage(chunks):
    return next(c.usage for _, c in reversed(chunks) if c.usage is not None)


@pytest.mark.parametrize("wrong_at", [None, 1])
def test_a_request_alone_verifies_lookup_drafts_and_its_reply_is_unchanged(single, batched, monkeypatch, wrong_at):
    plain = GenerationParams(max_tokens=20, cache_prompt=False)
    want, _, _ = alone(single, chat(PROMPTS[0]), plain)
    calls = _scripted_drafts(monkeypatch, want, len(single.last_prompt_ids), wrong_at)
    chunks = list(batched.generate_batch([chat(PROMPTS[0])], replace(plain, lookup=4)))
    assert [t for _, c in chunks for t in c.token_ids] == want
    usage = _usage(chunks)
    assert calls and usage.draft_tokens == sum(calls)
    if wrong_at is None:  # every draft token is the reply's: all kept, several tokens per step
        assert usage.accepted_draft_tokens == usage.draft_tokens > 0
        assert len(calls) < len(want) - 1
    else:  # each draft is kept up to its wrong token
        assert 0 < usage.accepted_draft_tokens < usage.draft_tokens
    slot = next(kv for kv in batched.batch.caches.slots if kv.length)
    assert slot.length == len(single.last_prompt_ids) + len(want) - 1  # no rejected draft left behind


def test_lookup_pauses_while_another_request_shares_the_batch(single, batched, monkeypatch):
    long, short = GenerationParams(max_tokens=24, cache_prompt=False), GenerationParams(max_tokens=4, cache_prompt=False)
    want_short, _, _ = alone(single, chat(PROMPTS[2]), short)
    want_long, _, _ = alone(single, chat(PROMPTS[3]), long)  # last: last_prompt_ids are its
    calls = _scripted_drafts(monkeypatch, want_long, len(single.last_prompt_ids), wrong_at=None)
    out = {0: [], 1: []}
    chunks = list(batched.generate_batch([chat(PROMPTS[3]), chat(PROMPTS[2])],
                                         [replace(long, lookup=4), replace(short, lookup=4)]))
    for i, c in chunks:
        out[i] += c.token_ids
    assert out == {0: want_long, 1: want_short}
    # drafts only once the short request has left: while both decoded, one token per step each
    assert 0 < len(calls) and _usage([x for x in chunks if x[0] == 0]).draft_tokens == sum(calls)
    assert _usage([x for x in chunks if x[0] == 1]).draft_tokens == 0
