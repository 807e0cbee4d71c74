"""POST /v1/chat/completions: validated request -> decoded messages + GenerationParams -> worker job ->
one JSON body, or an SSE stream (role chunk, content chunks, finish chunk, usage chunk, [DONE]).

Defaults for omitted fields follow the OpenAI API: temperature 1, top_p 1, no penalties, max_tokens
= until a stop token or the end of the context (or ServerSettings.default_max_tokens). Extensions in
the vLLM style: top_k (0 or -1 = off) and repetition_penalty (1 = off). temperature 0 = greedy.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from ..constrain import grammar_for
from ..errors import InputError
from ..types import GenerationChunk, GenerationParams, TokenLogprob, Usage
from .api_errors import ApiError, from_input_error, internal_error
from .media import MediaPolicy, to_runtime_messages
from .metrics import ServerMetrics
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ResponseMessage,
    TokenLogprobInfo,
    TopLogprob,
    UsageInfo,
    log_ignored_fields,
    unsupported,
)
from .settings import ServerSettings
from .speech_output import AudioOutput, audio_output, decode_reference
from .worker import DONE, Job, NotReady, QueueFull, Worker

_POLL_S = 0.1  # how often a waiting request checks that its client is still connected


class ClientGone(Exception):
    pass


@dataclass
class ServerState:
    """Everything one app instance shares between its routes (no module globals)."""

    settings: ServerSettings
    worker: Worker
    metrics: ServerMetrics
    media: MediaPolicy
    started: float = field(default_factory=time.time)


def served_names(state: ServerState) -> tuple[str, ...]:
    """The model ids this server answers to; the first is the one its replies name."""
    return state.settings.served_model_names or (state.worker.pipeline.model_name,)


def generation_params(req: ChatCompletionRequest, context_length: int, settings: ServerSettings) -> GenerationParams:
    """The request's sampling settings with the documented defaults filled in."""
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    max_tokens = req.max_completion_tokens or req.max_tokens or settings.default_max_tokens or context_length
    repetition_penalty = req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=stop,
        cache_prompt=req.cache_prompt is not False,
        lookup=settings.default_lookup if req.lookup is None else req.lookup,
        response_format=req.response_format.model_dump(by_alias=True) if req.response_format else None,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )


async def chat_completion(req: ChatCompletionRequest, request: Request, state: ServerState):
    """Run one chat completion; returns a JSONResponse or an event stream."""
    arrived = time.monotonic()
    request_id = f"chatcmpl-{secrets.token_hex(12)}"
    request.state.request_id = request_id
    pipeline = _check_request(req, state)
    log_ignored_fields(req)
    params = generation_params(req, pipeline.context_length, state.settings)
    audio = audio_output(req, pipeline)
    grammar_for(params.response_format)  # an unsupported schema is a 400 before the request queues
    if state.worker.full():  # refuse before downloading / decoding any image
        raise _queue_full(state.worker.retry_after())
    messages = await run_in_threadpool(to_runtime_messages, req.messages, state.media)
    await run_in_threadpool(decode_reference, req, audio)
    job = Job(request_id, messages, params, asyncio.get_running_loop(), submitted_at=arrived,
              speech=audio.speech if audio else None)
    _submit(job, state.worker)
    run = _Run(job, request, state, served_names(state)[0], arrived + state.settings.request_timeout, audio)
    handed_over = False  # once the stream exists, it owns the job
    try:
        first = await run.next_event()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            handed_over = True
            return _EventStream(run.sse(first, include_usage), on_close=job.cancelled.set)
        return await run.collect(first)
    except ClientGone:
        run.client_left()
        return Response(status_code=499)
    finally:
        if not handed_over:
            job.cancelled.set()


def _check_request(req: ChatCompletionRequest, state: ServerState):
    pipeline = state.worker.pipeline
    if state.worker.state != "ready":
        raise not_ready(state.worker)
    names = served_names(state)
    if req.model not in names:
        raise ApiError(404, f"The model '{req.model}' does not exist; this server serves "
                       f"{', '.join(repr(n) for n in names)}", param="model", code="model_not_found")
    problem = unsupported(req)
    if problem is not None:
        raise ApiError(400, problem[1], param=problem[0], code="unsupported_parameter")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    return pipeline


def not_ready(worker: Worker) -> ApiError:
    if worker.state == "failed":
        return ApiError(503, worker.load_error or "the model failed to load", type="server_error",
                        code="model_load_failed")
    return ApiError(503, "the model is still loading; retry shortly", type="server_error",
                    code="model_loading", headers={"Retry-After": "5"})


def _queue_full(retry_after: int) -> ApiError:
    return ApiError(429, "the server is busy: the request queue is full; retry later", type="rate_limit_error",
                    code="queue_full", headers={"Retry-After": str(retry_after)})


def _submit(job: Job, worker: Worker) -> None:
    try:
        worker.submit(job)
    except QueueFull as e:
        raise _queue_full(e.retry_after) from e
    except NotReady as e:
        raise not_ready(worker) from e


class _Run:
    """The request side of one job: waits for its events, turns them into response pieces."""

    def __init__(self, job: Job, request: Request, state: ServerState, model: str, deadline: float,
                 audio: AudioOutput | None = None):
        self.job, self.request, self.state, self.model, self.deadline = job, request, state, model, deadline
        self.audio = audio  # None: a text reply
        self.created = int(time.time())
        self.first_chunk_seen = False

    async def next_event(self) -> Any:
        """The next chunk (or DONE); raises ApiError for a failed generation, ClientGone, or a timeout."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._timeout()
            try:
                item = await asyncio.wait_for(self.job.events.get(), min(_POLL_S, left))
            except TimeoutError:
                if await self.request.is_disconnected():
                    raise ClientGone() from None
                continue
            if isinstance(item, InputError):
                raise from_input_error(item)
            if isinstance(item, Exception):
                raise internal_error(self.job.request_id)
            if isinstance(item, GenerationChunk) and not self.first_chunk_seen:
                self._record_start()
            return item

    async def collect(self, item: Any) -> JSONResponse:
        texts: list[str] = []
        entries: list[TokenLogprob] = []
        sound: list = []
        while item is not DONE:
            texts.append(item.text)
            entries += item.logprobs or ()
            if item.audio is not None:
                sound.append(item.audio)
            if item.finish_reason is not None:
                usage = self._usage(item.usage)
                text = "".join(texts)
                message = (ResponseMessage(content=text) if self.audio is None else
                           ResponseMessage(content=None, audio=self.audio.message_audio(text, sound)))
                choice = Choice(message=message, finish_reason=item.finish_reason, logprobs=self._logprobs(entries))
                body = ChatCompletion(id=self.job.request_id, created=self.created, model=self.model,
                                      choices=[choice], usage=usage)
                return JSONResponse(body.model_dump(mode="json"))
            item = await self.next_event()
        raise _shutting_down()

    async def sse(self, item: Any, include_usage: bool) -> AsyncIterator[str]:
        ended = False  # False at the finally: the client left (ClientGone, or the task was cancelled)
        try:
            yield self._chunk(Delta(role="assistant", content=""))
            while item is not DONE:
                if item.audio is not None:
                    yield self._chunk(Delta(audio=self.audio.delta_audio(item.audio)))
                if item.text or item.logprobs:  # a token whose text is held back still has its logprob
                    delta = Delta(content=item.text) if self.audio is None else Delta(audio={"transcript": item.text})
                    yield self._chunk(delta, logprobs=self._logprobs(item.logprobs or []))
                if item.finish_reason is not None:
                    usage = self._usage(item.usage)
                    yield self._chunk(Delta(), finish_reason=item.finish_reason)
                    if include_usage:
                        yield self._event(ChatCompletionChunk(id=self.job.request_id, created=self.created,
                                                              model=self.model, choices=[], usage=usage))
                    break
                item = await self.next_event()
            else:
                raise _shutting_down()
            ended = True
        except ClientGone:
            return
        except ApiError as e:  # headers are sent already: report in the stream, as OpenAI does
            ended = True
            self.request.state.status_override = e.status
            self.request.state.error = e.log_text()
            yield f"data: {_json(e.body())}\n\n"
        finally:
            self.job.cancelled.set()
            if not ended:
                self.client_left()
        yield "data: [DONE]\n\n"

    def client_left(self) -> None:
        self.state.metrics.cancelled.inc()
        self.request.state.status_override = 499  # nginx's "client closed request": only the log sees it

    def _logprobs(self, entries: list[TokenLogprob]) -> ChoiceLogprobs | None:
        """OpenAI's choice.logprobs for these tokens; None unless the request asked for logprobs."""
        if not self.job.params.logprobs:
            return None
        return ChoiceLogprobs(content=[TokenLogprobInfo(**_top(e), top_logprobs=[TopLogprob(**_top(t)) for t in e.top])
                                       for e in entries])

    def _chunk(self, delta: Delta, finish_reason: str | None = None, logprobs: ChoiceLogprobs | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return self._event(ChatCompletionChunk(id=self.job.request_id, created=self.created, model=self.model,
                                               choices=[choice]))

    @staticmethod
    def _event(chunk: ChatCompletionChunk) -> str:
        return f"data: {chunk.model_dump_json()}\n\n"

    def _usage(self, usage: Usage | None) -> UsageInfo:
        usage = usage or Usage()
        m = self.state.metrics
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.completion_tokens.inc(usage.completion_tokens)
        self.request.state.usage = usage
        return UsageInfo(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                         total_tokens=usage.prompt_tokens + usage.completion_tokens,
                         prompt_tokens_details={"cached_tokens": usage.cached_prompt_tokens},
                         completion_tokens_details={
                             "accepted_prediction_tokens": usage.accepted_draft_tokens,
                             "rejected_prediction_tokens": usage.draft_tokens - usage.accepted_draft_tokens})

    def _record_start(self) -> None:
        self.first_chunk_seen = True
        now, job = time.monotonic(), self.job
        self.state.metrics.first_token.observe(now - job.submitted_at)
        if job.started_at is not None:
            self.request.state.queue_seconds = job.started_at - job.submitted_at
            self.state.metrics.queue_wait.observe(job.started_at - job.submitted_at)

    def _timeout(self) -> ApiError:
        self.job.cancelled.set()
        self.state.metrics.cancelled.inc()
        where = "while generating" if self.job.started_at is not None else "while waiting for the model"
        return ApiError(504, f"the request timed out after {self.state.settings.request_timeout:g} s ({where})",
                        type="timeout_error", code="request_timeout")


def _top(entry: TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def _json(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _EventStream(StreamingResponse):
    """An SSE response that cancels its job however it ends (finished, client gone, task cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass  # the client went away mid-stream: there is nobody to answer
        finally:
            self._on_close()
            await self.body_iterator.aclose()
