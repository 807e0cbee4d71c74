"""Prompt lookup decoding: the draft finder, the accept/reject bookkeeping on a scripted decoder, and on
a real bundle the same tokens as plain decoding, with drafts that are kept and drafts that miss."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmo.runtime import generate as gen
from minicpmo.runtime.errors import InputError
from minicpmo.runtime.generate import DraftLength, StepStats, generate_tokens, lookup_draft
from minicpmo.runtime.pipeline import Pipeline
from minicpmo.runtime.sampler import make_sampler
from minicpmo.runtime.types import GenerationParams


def test_lookup_draft_takes_the_latest_longest_match():
    #            0  1  2  3  4  5  6  7  8  9 10 11
    h = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    # the tail (1, 2, 3) occurs at 1 and 5; the latest one is followed by 7, 8, 1
    assert lookup_draft(h, 3).tolist() == [7, 8, 1]
    assert lookup_draft(h, 10).tolist() == [7, 8, 1, 2, 3]  # runs up to the tail, not past the end
    assert lookup_draft(h, 0).tolist() == []


def test_lookup_draft_falls_back_to_two_tokens_and_never_to_one():
    assert lookup_draft(np.array([4, 6, 9, 0, 6, 9]), 2).tolist() == [0, 6]  # (6, 9) matches, (4, 6, 9) not
    assert lookup_draft(np.array([4, 6, 9, 0, 2, 9]), 2).tolist() == []  # only (9,) occurs earlier
    assert lookup_draft(np.array([1, 2]), 2).tolist() == []  # nothing before the tail
    assert lookup_draft(np.array([3, 3, 3]), 4).tolist() == [3]  # overlapping matches are fine


def test_draft_length_grows_with_kept_drafts_and_backs_off_after_misses():
    d = DraftLength(4, cost=0.15)
    assert d() == 2  # even odds: a third token would add 1/8 of a token for 0.15 of a step
    for _ in range(10):
        d.update(d(), d())  # every draft kept
    assert d() == 4
    drafting = []
    for _ in range(200):  # every draft missed
        n = d()
        drafting.append(n > 0)
        d.update(n, 0)
    assert sum(drafting[:20]) >= 10  # a few misses do not stop it...
    assert 0 < sum(drafting[100:]) < 25  # ...a run of them does, but it still retries now and then
    assert DraftLength(0)() == 0
    assert DraftLength(4, prior=0.5, cost=0.3)() == 1 and DraftLength(4, prior=0.2, cost=0.3)() == 0


class _ScriptedKV:
    def __init__(self, max_length):
        self.keys, self.max_length = [], max_length

    @property
    def length(self):
        return len(self.keys)

    def truncate(self, n):
        del self.keys[n:]

    def common_prefix(self, keys):
        return 0


class ScriptedDecoder:
    """A 'model' whose next token is a function of the previous two fed tokens (so contexts repeat):
    one-hot logits, a cache that records what was fed, and a log of every step's width."""

    multi_logits = True

    def __init__(self, rule, vocab=50, max_length=512):
        self.rule, self.vocab, self.kv, self.steps = rule, vocab, _ScriptedKV(max_length), []

    def _logits(self, keys):
        fed = self.kv.keys + list(keys)
        rows = np.zeros((len(keys), self.vocab), np.float32)
        for i in range(len(keys)):
            pos = len(self.kv.keys) + i
            rows[i, self.rule(fed[max(pos - 1, 0)], fed[pos], pos)] = 1.0
        return rows

    def forward_all(self, embeds, keys):
        rows = self._logits(keys)
        self.kv.keys += list(keys)
        self.steps.append(len(keys))
        return rows

    def forward(self, embeds, keys):
        return self.forward_all(embeds, keys)[-1]

    def prefill(self, embeds, keys):
        return self.forward(embeds, keys)


def _run(decoder, prompt, lookup, max_tokens=60, stop_ids=(), params=None):
    stats = StepStats()
    sampler = make_sampler(params or GenerationParams())
    ids = np.asarray(prompt)
    out = list(generate_tokens(decoder, lambda t: np.zeros((len(t), 4), np.float32), ids, list(prompt), ids,
                               sampler, max_tokens, set(stop_ids), stats, lookup=lookup))
    return out, stats


def _cycle(prev, tok, pos):
    return (tok * 7 + 3) % 11 + 10 * (pos > 40)  # a cycle of period 10, then a different one


@pytest.mark.parametrize("lookup", [1, 2, 4, 8])
def test_scripted_model_gives_the_same_tokens_in_fewer_steps(lookup):
    plain, _ = _run(ScriptedDecoder(_cycle), [1, 2, 3], 0)
    dec = ScriptedDecoder(_cycle)
    ours, stats = _run(dec, [1, 2, 3], lookup)
    assert ours == plain and len(ours) == 60
    assert stats.accepted_draft_tokens > 0 and stats.draft_tokens > stats.accepted_draft_tokens  # kept and missed
    assert len(dec.steps) < 1 + 59  # prefill + one step per token without lookup
    assert min(lookup + 1, 4) <= max(dec.steps[1:]) <= lookup + 1  # drafts grow while they are kept
    # the cache holds exactly the fed prefix of what was generated (the last token is never fed)
    assert dec.kv.keys == [1, 2, 3] + ours[:-1]


def test_scripted_model_stop_and_max_tokens_inside_a_draft():
    plain, _ = _run(ScriptedDecoder(_cycle), [1, 2, 3], 0)
    stop = plain[25]
    ours, _ = _run(ScriptedDecoder(_cycle), [1, 2, 3], 8, stop_ids=[stop])
    assert ours == plain[:plain.index(stop) + 1]
    for n in (1, 2, 17, 33):
        dec = ScriptedDecoder(_cycle)
        ours, _ = _run(dec, [1, 2, 3], 8, max_tokens=n)
        assert ours == plain[:n]
        assert len(dec.kv.keys) <= 3 + n  # a draft never runs past max_tokens


def test_scripted_model_never_overflows_the_cache():
    dec = ScriptedDecoder(_cycle, max_length=30)
    ours, _ = _run(dec, [1, 2, 3], 8, max_tokens=27)
    assert len(ours) == 27 and dec.kv.length <= 30


def test_sampling_draws_the_same_tokens_with_drafts():
    """Sampled decoding: each position is drawn from the same distribution with the same random draw,
    so a seeded reply does not change when drafts are verified."""
    def soft(prev, tok, pos):
        return (tok * 7 + 3) % 11

    class Soft(ScriptedDecoder):
        def _logits(self, keys):
            return 3.0 * super()._logits(keys)  # p(top) ~ 0.65: draws leave the cycle often

    params = GenerationParams(temperature=1.0, seed=5)
    plain, _ = _run(Soft(soft, vocab=12), [1, 2, 3], 0, params=params)
    ours, stats = _run(Soft(soft, vocab=12), [1, 2, 3], 4, params=params)
    assert ours == plain and stats.draft_tokens > 0


# -- a real bundle ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_pipe(fp32_bundle):
    return Pipeline.load(fp32_bundle, provider="cpu", context_length=512)


@pytest.fixture(scope="module")
def int4_pipe(int4_bundle):
    return Pipeline.load(int4_bundle, provider="cpu", context_length=512)


MESSAGES = [{"role": "user", "content": "Tell me a story about a robot."}]


def test_decoder_graph_feeds_logits_start_straight_to_slice(int4_bundle):
    """No node computes from it: a node feeding Slice's starts would run on the CPU, and a CUDA graph
    needs every node on the GPU."""
    import onnx

    from minicpmo.runtime.manifest import load_manifest

    graph = onnx.load(int4_bundle / "decoder.onnx", load_external_data=False).graph
    users = [n for n in graph.node if "logits_start" in n.input]
    assert [(n.op_type, list(n.input).index("logits_start")) for n in users] == [("Slice", 1)]
    assert load_manifest(int4_bundle)["decoder"]["io"]["logits_start"] == "logits_start"


def test_multi_position_logits_match_single_steps(fp32_pipe, int4_pipe):
    """forward_all's rows equal the logits of feeding the same tokens one step at a time (fp32), and
    stay close with the int4 graph and its rescored head."""
    for pipe, atol in ((fp32_pipe, 1e-4), (int4_pipe, None)):
        ids = np.array(pipe.tokenizer.encode("one two three four five six seven"))
        d = pipe.decoder
        pipe.kv.reset()
        d.prefill(pipe.embed(ids[:3]), ids[:3].tolist())
        rows = d.forward_all(pipe.embed(ids[3:]), ids[3:].tolist()).copy()
        assert rows.shape == (len(ids) - 3, d.vocab_size)
        pipe.kv.reset()
        d.prefill(pipe.embed(ids[:3]), ids[:3].tolist())
        single = np.stack([d.forward(pipe.embed(ids[i:i + 1]), [int(ids[i])]).copy() for i in range(3, len(ids))])
        if atol:
            np.testing.assert_allclose(rows, single, atol=atol, rtol=0)
        else:  # int8 activations: a last-bit difference may round an activation the other way
            assert np.abs(rows - single).max() < 0.05 * np.abs(single).max()
        pipe.kv.reset()


def _oracle_run(pipe, monkeypatch, max_tokens=40):
    """The plain reply, then a reply drafted by an oracle that knows the plain reply but gets every
    third draft token wrong (so drafts are both kept and dropped). Stop ids are off, so both replies run
    `max_tokens` long whatever the weights."""
    monkeypatch.setattr(pipe, "stop_ids", set())
    pipe.kv.reset()
    plain = list(pipe.generate(MESSAGES, GenerationParams(max_tokens=max_tokens, cache_prompt=False)))
    reply = [t for c in plain for t in c.token_ids]
    prompt = list(pipe.last_prompt_ids)

    def oracle(history, max_tokens, ngrams=None):
        done = len(history) - len(prompt)
        draft = np.array(reply[done:done + max_tokens], dtype=np.int64)
        draft[2::3] = np.where(draft[2::3] > 0, draft[2::3] - 1, 1)  # wrong: the rest is never reached
        return draft

    monkeypatch.setattr(gen, "lookup_draft", oracle)
    chunks = list(pipe.generate(MESSAGES, GenerationParams(max_tokens=max_tokens, cache_prompt=False, lookup=4)))
    monkeypatch.undo()
    return prompt, reply, chunks


def test_fp32_reply_is_unchanged_by_drafts(fp32_pipe, monkeypatch):
    prompt, reply, chunks = _oracle_run(fp32_pipe, monkeypatch)
    assert [t for c in chunks for t in c.token_ids] == reply
    usage = chunks[-1].usage
    assert usage.accepted_draft_tokens > 10 and usage.draft_tokens > usage.accepted_draft_tokens
    # The follow-up turn re-uses the cache the drafts went through.
    follow = MESSAGES + [{"role": "assistant", "content": "".join(c.text for c in chunks)},
                         {"role": "user", "content": "And then?"}]
    warm = list(fp32_pipe.generate(follow, GenerationParams(max_tokens=8, lookup=4)))
    assert warm[-1].usage.cached_prompt_tokens >= len(prompt)


def test_int4_cache_holds_what_was_generated(int4_pipe, monkeypatch):
    """With int8 activations the reply may part from plain decoding's; whatever it is, the cache holds
    exactly the prompt and the reply (no dropped draft left behind), so a follow-up turn can re-use it."""
    prompt, _, chunks = _oracle_run(int4_pipe, monkeypatch)
    ours = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].usage.accepted_draft_tokens > 0
    assert chunks[-1].finish_reason == "length" and len(ours) == 40
    assert int4_pipe.kv.keys == prompt + ours[:-1]  # the last token is sampled, never fed


def test_lookup_needs_a_bundle_with_multi_position_logits(int4_pipe, monkeypatch):
    monkeypatch.setattr(int4_pipe.decoder, "multi_logits", False)
    with pytest.raises(InputError, match="re-export"):
        next(int4_pipe.generate(MESSAGES, GenerationParams(lookup=2)))
    with pytest.raises(InputError, match="lookup"):
        next(int4_pipe.generate(MESSAGES, GenerationParams(lookup=17)))
