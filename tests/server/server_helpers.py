"""Test doubles and helpers for the server tests: a deterministic FakePipeline, a real uvicorn server in
a thread, a small image HTTP server with redirects, and image encoders."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import httpx
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from minicpmo.runtime.errors import ContextLengthError, InputError
from minicpmo.runtime.server import ServerSettings, create_app
from minicpmo.runtime.types import GenerationChunk, GenerationParams, Message, Usage

N_REPLY_TOKENS = 16  # a full reply has this many tokens, then finish_reason "stop"


def describe(messages: list[Message]) -> str:
    """A canonical text of decoded messages; images are named by a hash of their pixels."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        for part in content:
            if part["type"] == "text":
                out.append(f"{m['role']}:text:{part['text']}")
            elif part["type"] == "image":
                img = part["image"]
                out.append(f"{m['role']}:image:{img.size}:{hashlib.md5(img.tobytes()).hexdigest()}")
            else:
                out.append(f"{m['role']}:{part['type']}")
    return "|".join(out)


def reply_tokens(messages: list[Message], max_tokens: int = N_REPLY_TOKENS) -> list[str]:
    digest = hashlib.sha256(describe(messages).encode()).hexdigest()
    return [digest[i:i + 4] + " " for i in range(0, 64, 4)][:max_tokens]


def reply_for(messages: list[Message], max_tokens: int = N_REPLY_TOKENS) -> str:
    """The text the FakePipeline answers to these (decoded) messages."""
    return "".join(reply_tokens(messages, max_tokens))


def prompt_token_count(messages: list[Message]) -> int:
    text = describe(messages)
    return len(text.split()) + 10 * text.count(":image:")


class FakePipeline:
    """Deterministic stand-in for runtime.Pipeline.

    Prompt text triggers: "RAISE_INPUT" -> InputError, "CRASH" -> RuntimeError (both at the first next()),
    "LONG " * n -> ContextLengthError when past the context.
    """

    model_name = "fake-model"
    context_length = 200

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay
        self.calls: list[tuple[list[Message], GenerationParams]] = []
        self.closed_early: list[str] = []
        self.closed_event = threading.Event()
        self.started_event = threading.Event()
        self._busy = threading.Lock()

    def generate(self, messages: list[Message], params: GenerationParams) -> Iterator[GenerationChunk]:
        if not self._busy.acquire(blocking=False):
            raise AssertionError("generate() ran concurrently: the server must use one worker")
        text = describe(messages)
        try:
            self.calls.append((messages, params))
            self.started_event.set()
            yield from self._reply(messages, params, text)
        except GeneratorExit:
            self.closed_early.append(text)
            self.closed_event.set()
            raise
        finally:
            self._busy.release()

    def _reply(self, messages, params, text) -> Iterator[GenerationChunk]:
        if "RAISE_INPUT" in text:
            raise InputError("the fake refuses this input", param="messages")
        if "CRASH" in text:
            raise RuntimeError("the fake pipeline crashed")
        n_prompt = prompt_token_count(messages)
        if n_prompt >= self.context_length:
            raise ContextLengthError(f"the prompt has {n_prompt} tokens, more than the context", param="messages")
        tokens = reply_tokens(messages, min(params.max_tokens, self.context_length - n_prompt))
        for i, token in enumerate(tokens):
            if self.step_delay:
                time.sleep(self.step_delay)
            yield GenerationChunk(text=token, token_ids=[i])
        finish = "stop" if len(tokens) == N_REPLY_TOKENS else "length"
        yield GenerationChunk(finish_reason=finish, usage=Usage(prompt_tokens=n_prompt, completion_tokens=len(tokens)))


def user(*parts) -> dict:
    """A request message: strings become text parts, PIL images become data-URI image parts."""
    content = []
    for p in parts:
        if isinstance(p, Image.Image):
            content.append({"type": "image_url", "image_url": {"url": data_uri(p)}})
        elif isinstance(p, str):
            content.append({"type": "text", "text": p})
        else:
            content.append(p)
    return {"role": "user", "content": content}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def make_image(seed: int, size: tuple[int, int] = (24, 16)) -> Image.Image:
    img = Image.new("RGB", size, (seed * 40 % 256, seed * 90 % 256, 200))
    img.putpixel((seed % size[0], 0), (255, 255, 255))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode()


def data_uri(img: Image.Image) -> str:
    return f"data:image/png;base64,{b64(img)}"


def sse_events(text: str) -> list:
    """The JSON payloads (and the final "[DONE]") of an SSE body."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def live_server(app, startup_timeout: float = 10.0) -> Iterator[str]:
    """Run `app` on a real uvicorn server on 127.0.0.1 (random port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until(lambda: server.started, startup_timeout):
            raise RuntimeError("uvicorn did not start")
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, startup_timeout, 0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """/img/N.png -> PNG of make_image(N); /redirect/K/N.png -> K redirects then the image;
    /away?to=URL -> redirect to URL; /text -> not an image; /slow -> waits 3 s; else 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        parts = self.path.strip("/").split("/")
        if parts[0] == "img":
            self._send(200, png_bytes(make_image(int(parts[1].split(".")[0]))), "image/png")
        elif parts[0] == "redirect":
            left = int(parts[1])
            target = f"/redirect/{left - 1}/{parts[2]}" if left > 1 else f"/img/{parts[2]}"
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[0].startswith("away?to="):
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(parts[0][len("away?to="):] + "/" + "/".join(parts[1:])))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts[0] == "text":
            self._send(200, b"this is not an image", "text/plain")
        elif parts[0] == "slow":
            time.sleep(3)
            self._send(200, b"late", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@contextlib.contextmanager
def image_server() -> Iterator[str]:
    """A local HTTP server of test images on 127.0.0.1; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def started_client(pipeline, **settings) -> Iterator[TestClient]:
    """A TestClient on create_app(pipeline, ServerSettings(**settings)), lifespan run, model loaded."""
    app = create_app(pipeline, ServerSettings(**settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert wait_until(lambda: app.state.server.worker.state != "loading", 5)
        client.app_state = app.state.server
        yield client


@contextlib.contextmanager
def running_server(pipeline, **settings) -> Iterator[tuple[str, object]]:
    """(base URL, ServerState) of a real uvicorn server on the pipeline."""
    app = create_app(pipeline, ServerSettings(**settings))
    with live_server(app) as url:
        yield url, app.state.server
