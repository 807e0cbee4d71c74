"""Pydantic models of the OpenAI chat API subset this server speaks (requests strict, responses plain).

Requests are strict: wrong JSON types are refused instead of coerced ("10" is not an int), and unknown
fields are refused, as the OpenAI API does, so a typo ("max_token", "imageurl") is a 400 rather than a
silently ignored setting. Three kinds of declared fields:
- used: the sampling fields, stop, stream, response_format (text, json_object, json_schema),
  logprobs and top_logprobs, the extensions top_k, min_p, repetition_penalty (and llama.cpp's name
  repeat_penalty), cache_prompt, lookup;
- ignored (IGNORED_FIELDS; logged once at debug): fields of OpenAI and of other OpenAI-compatible
  servers that change nothing in the reply here (user, metadata, store, OpenRouter's provider...),
  and on messages `name`, `tool_call_id`, `cache_control` (prompt-caching hints);
- refused by `unsupported()` unless at their "off" value: features that would change the output and
  are not implemented (n > 1, tools, logit_bias).
Audio output (`modalities`, `audio`) is checked by speech_output.py.
An assistant message may carry `tool_calls` and `tool` messages may follow it: a history from a client
that uses tools elsewhere is rendered by the model's chat template (its <tool_call> format).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..sampler import MAX_LOOKUP, MAX_TOP_LOGPROBS

log = logging.getLogger(__name__)
_STRICT = ConfigDict(extra="forbid", strict=True)
_OUT = ConfigDict(extra="forbid")

# Shared bounds (the OpenAI ones where OpenAI has one).
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy. Default 1.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Default 1 (off).")]
TopK = Annotated[int, Field(ge=-1, description="0 or -1 = off (default).")]
MinP = Annotated[float, Field(ge=0.0, le=1.0, description="Drop tokens below this share of the best one's "
                                                          "probability; 0 = off (default).")]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, description="Default 0.")]
Lookup = Annotated[int, Field(ge=0, le=MAX_LOOKUP, description="Prompt lookup draft tokens per step; 0 = off.")]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, description="1 = off (default).")]
MaxTokens = Annotated[int, Field(ge=1)]
StopText = Annotated[str, Field(min_length=1)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true.")]


CacheControl = Annotated[dict[str, Any] | None, Field(None, description="Prompt-caching hint; ignored.")]


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str
    cache_control: CacheControl = None


class ImageURL(BaseModel):
    model_config = _STRICT
    url: str = Field(min_length=1, description="http(s) URL, data: URI, raw base64, or an allowed local path")
    detail: Literal["auto", "low", "high"] | None = Field(
        None, description="low: one slice (the whole image at 448 px, 64 tokens); auto/high: up to 9 slices.")


class ImagePart(BaseModel):
    model_config = _STRICT
    type: Literal["image_url"]
    image_url: ImageURL | Annotated[str, Field(min_length=1)]  # a bare string: the url (vLLM accepts it too)
    cache_control: CacheControl = None

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url

    @property
    def detail(self) -> str | None:
        return None if isinstance(self.image_url, str) else self.image_url.detail


class InputAudio(BaseModel):
    model_config = _STRICT
    data: str = Field(min_length=1, description="base64-encoded audio file")
    format: str = Field(min_length=1, max_length=16, description="wav, mp3, flac, ...")


class AudioPart(BaseModel):
    model_config = _STRICT
    type: Literal["input_audio"]
    input_audio: InputAudio
    cache_control: CacheControl = None


class VideoFrames(BaseModel):
    model_config = _STRICT
    frames: list[Annotated[str, Field(min_length=1)]] = Field(
        min_length=1, max_length=64, description="the frames in order, each like image_url.url")
    max_slices: Literal[1, 2] = 2


class VideoPart(BaseModel):
    """Extension (not in the OpenAI API): a video as sampled frames, fed as the model card does."""

    model_config = _STRICT
    type: Literal["video_frames"]
    video_frames: VideoFrames


UserPart = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]


class SystemMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer"]  # "developer" is OpenAI's newer name for the system role
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(BaseModel):
    model_config = _STRICT
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class ToolCallFunction(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; the template gets the parsed object


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None  # present in some clients' accumulated stream deltas


class AssistantMessage(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(BaseModel):
    """A tool's result in a history (rendered as the template's <tool_response>)."""

    model_config = _STRICT
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None
    name: str | None = None


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any JSON object (OpenAI's JSON mode)."""

    model_config = _STRICT
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the grammar is enforced either way


class JsonSchemaFormat(BaseModel):
    """A reply that validates against a JSON Schema (what openai's `parse` and LangChain's
    `with_structured_output` send)."""

    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions body."""

    model_config = _STRICT
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None  # wins over max_tokens when both are given
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    repeat_penalty: RepetitionPenalty | None = None  # llama.cpp's name for repetition_penalty
    seed: int | None = None
    stop: StopText | list[StopText] | None = Field(None, max_length=16)
    n: int | None = None  # only 1 is served
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    cache_prompt: bool | None = None  # extension (llama.cpp server's name): false = no KV prefix reuse
    lookup: Lookup | None = None  # extension: prompt lookup draft tokens per step (the server's default)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    # accepted and ignored (IGNORED_FIELDS): OpenAI's ...
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # ... and other OpenAI-compatible servers': llama.cpp's slot, vLLM's priority, OpenRouter's routing
    id_slot: int | None = None
    priority: int | None = None
    provider: dict[str, Any] | None = None
    transforms: list[str] | None = None
    route: str | None = None
    models: list[str] | None = None
    # accepted only at their "off" value (see unsupported())
    logit_bias: dict[str, float] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    functions: list[dict[str, Any]] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None  # audio output settings


IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier", "id_slot", "priority", "provider", "transforms", "route", "models")
_logged_ignored: set[str] = set()  # each ignored field is logged once per process


def log_ignored_fields(req: ChatCompletionRequest) -> None:
    for name in sorted(req.model_fields_set & set(IGNORED_FIELDS) - _logged_ignored):
        _logged_ignored.add(name)
        log.debug("request field %r is accepted for compatibility and ignored (it changes nothing here)", name)


def unsupported(req: ChatCompletionRequest) -> tuple[str, str] | None:
    """(param, message) for the first requested feature this server does not implement, else None."""
    if (req.repetition_penalty is not None and req.repeat_penalty is not None
            and req.repetition_penalty != req.repeat_penalty):
        return "repeat_penalty", "repeat_penalty and repetition_penalty are the same setting; they differ here"
    if req.n is not None and req.n != 1:
        return "n", f"n must be 1 (this server returns a single choice), got {req.n}"
    if req.logit_bias:
        return "logit_bias", "logit_bias is not supported by this server"
    if req.tools or req.functions:
        return "tools" if req.tools else "functions", "tools / function calling are not supported by this server"
    if req.tool_choice not in (None, "none", "auto") or req.function_call not in (None, "none", "auto"):
        return "tool_choice", "tool_choice is not supported by this server"
    return None


# -- responses ----------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    model_config = _OUT
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    # OpenAI's names for predicted tokens: here the prompt lookup draft tokens kept and dropped
    completion_tokens_details: dict[str, int] | None = None


class ResponseMessage(BaseModel):
    model_config = _OUT
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is audio: its text is audio.transcript (as OpenAI)
    audio: dict[str, Any] | None = None  # speech_output.AudioOutput.message_audio

    @model_serializer(mode="wrap")
    def _audio_only_when_spoken(self, handler) -> dict[str, Any]:
        out = handler(self)
        if out.get("audio") is None:
            out.pop("audio", None)
        return out


class TopLogprob(BaseModel):
    model_config = _OUT
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    model_config = _OUT
    content: list[TokenLogprobInfo] | None
    refusal: None = None


class Choice(BaseModel):
    model_config = _OUT
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    model_config = _OUT
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo


class Delta(BaseModel):
    model_config = _OUT
    role: Literal["assistant"] | None = None
    content: str | None = None
    audio: dict[str, Any] | None = None  # speech: transcript or data pieces (speech_output.py)

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler) -> dict[str, Any]:  # OpenAI sends {"content": "..."}, no nulls
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    model_config = _OUT
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    model_config = _OUT
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    model_config = _OUT
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minicpmo-onnx"
    context_length: int


class ModelList(BaseModel):
    model_config = _OUT
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    model_config = _OUT
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    model_config = _OUT
    error: ErrorDetail
