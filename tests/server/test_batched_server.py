"""`--parallel`: concurrent requests through the real openai client against a real server on an fp32
bundle decode together, with the replies each gets alone, and a short request does not wait for a
long one to finish."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from minicpmo.runtime.pipeline import Pipeline
from server_helpers import running_server, wait_until

PARALLEL = 3
PROMPTS = ["Describe a lighthouse.", "Count: " + "one two three " * 30, "Hi", "Name three rivers.",
           "What is a prime number?"]


@pytest.fixture(scope="module")
def served(fp32_bundle):
    pipeline = Pipeline.load(fp32_bundle, provider="cpu", context_length=512, parallel=PARALLEL)
    with running_server(pipeline, parallel=PARALLEL) as (url, state):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120), state


def ask(client: openai.OpenAI, text: str, stream: bool = False, **kw) -> tuple[str, int]:
    """(reply text, completion tokens); no KV prefix reuse, so every reply starts from a cold cache."""
    args = dict(model=client.models.list().data[0].id, messages=[{"role": "user", "content": text}],
                extra_body={"cache_prompt": False}, **kw)
    if not stream:
        r = client.chat.completions.create(**args)
        return r.choices[0].message.content, r.usage.completion_tokens
    text, n = "", 0
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return text, n


def test_concurrent_greedy_replies_are_the_replies_alone(served):
    client, state = served
    alone = [ask(client, p, max_tokens=12, temperature=0) for p in PROMPTS]
    peak, polling = [0], threading.Event()

    def poll():
        while not polling.is_set():
            peak[0] = max(peak[0], state.worker.running)
            time.sleep(0.002)

    def one(i):
        return ask(client, PROMPTS[i], stream=i % 2 == 0, max_tokens=12, temperature=0)

    watcher = threading.Thread(target=poll)
    watcher.start()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # more clients than slots: some wait, then join
        together = list(pool.map(one, range(len(PROMPTS))))
    polling.set()
    watcher.join()
    assert together == alone
    assert 2 <= peak[0] <= PARALLEL
    assert wait_until(lambda: state.worker.running == 0, 5)


def test_seeded_sampling_is_per_request_under_concurrency(served):
    client, _ = served
    kw = [dict(temperature=1.0, seed=s, max_tokens=10) for s in (5, 6)]
    alone = [ask(client, "Tell me a story.", **k) for k in kw]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda k: ask(client, "Tell me a story.", stream=True, **k), kw))
    assert together == alone


def test_a_short_request_is_not_stuck_behind_a_long_one(served):
    client, state = served
    long_done = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(lambda: (ask(client, "Write at length.", max_tokens=480, temperature=0), long_done.set())[0])
        assert wait_until(lambda: state.worker.running == 1, 30)
        t0 = time.monotonic()
        short = ask(client, "Hi", max_tokens=2)
        short_seconds = time.monotonic() - t0
        finished_first = not long_done.is_set()
        assert long.result(timeout=300)[1] > 100, "the long reply stopped early: too short to test this"
    assert short[1] == 2 and finished_first  # one generation at a time would have made it wait
    assert short_seconds < 60  # generous on any host: two decode steps and a prefill


def test_structured_output_and_logprobs_while_batched(served):
    """A json_schema request decoding beside plain ones still validates, and logprobs come back per
    token: the scheduler samples with the request's own constrained sampler."""
    jsonschema = pytest.importorskip("jsonschema")
    client, _ = served
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "rank": {"type": "integer"}},
              "required": ["city", "rank"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}}
    model = client.models.list().data[0].id

    def structured():
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A city?"}],
                                              max_tokens=60, temperature=0, response_format=fmt, logprobs=True,
                                              top_logprobs=2)

    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(ask, client, p, max_tokens=20, temperature=0) for p in PROMPTS[:2]]
        reply = pool.submit(structured).result()
        [f.result() for f in others]
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    import json

    jsonschema.validate(json.loads(choice.message.content), schema)
    entries = choice.logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert "".join(e.token for e in entries) == choice.message.content


def test_a_spoken_reply_runs_alone_beside_the_batch(served):
    """Audio output on a batching server: the speech request waits for the batch in flight, then speaks."""
    sf = pytest.importorskip("soundfile")
    import base64
    import io

    client, state = served
    if state.worker.pipeline.tts is None:
        pytest.skip("the test bundle has no speech model")
    state.worker.pipeline.speech_info = {**state.worker.pipeline.speech_info, "max_new_codes": 60}
    model = client.models.list().data[0].id
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(ask, client, PROMPTS[0], max_tokens=12, temperature=0)
        spoken = pool.submit(lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0,
            modalities=["text", "audio"], audio={"voice": "default", "format": "wav"})).result()
        assert other.result()[1] > 0
    samples, rate = sf.read(io.BytesIO(base64.b64decode(spoken.choices[0].message.audio.data)), dtype="float32")
    assert rate == 24000 and len(samples) > 0
