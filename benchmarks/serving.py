"""Concurrent streaming clients against `minicpmo serve --parallel` and llama.cpp's servers, in one run.

    python -m benchmarks.serving BUNDLE [--gguf MODEL.gguf [--llama-server BINARY]] [--clients 1,2,4,8]
                                 [--image-clients 1,4] [--prompt-tokens 256] [--max-tokens 48]
                                 [--parallel 8] [--rounds 2]

Each server runs as a subprocess (2 threads), all of them started before the first request. Rounds go
server by server and client count by client count, in alternating order, so a neighbour's load on a
shared machine spreads over every row. For each client count n, n real `openai` clients send one
streaming greedy request each at the same moment; each prompt is ~`prompt-tokens` tokens of its own
text (no shared prefix), optionally with cli/assets/demo.png (ours only: the GGUF has no vision
projector). Per run:
- aggregate decode tok/s: the tokens streamed while all n streams were decoding at once (from the
  last stream's first token to the first stream's last) over that window: batched decoding itself,
  without the prompts' prefill (blank when the streams never all decoded at once);
- output tok/s: every token over the whole run (prefill and queueing included);
- TPOT: each stream's (last token - first token) / (tokens - 1), p50/p95 over the streams, and the
  p95 of the gaps between consecutive tokens (where another prompt's prefill chunk shows);
- TTFT p50.
llama.cpp's peer: `--llama-server` runs llama.cpp's own `llama-server` binary (built from the
llama.cpp sources that llama-cpp-python vendors: `cmake -S vendor/llama.cpp -B build
-DLLAMA_BUILD_SERVER=ON && cmake --build build --target llama-server`) with `--parallel` slots of the
same per-slot context as ours; without it, llama-cpp-python's server (`python -m llama_cpp.server`),
which decodes one request at a time.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from .common import _machine_busy_s, _own_cpu_s, setup_logging

log = logging.getLogger("benchmarks.serving")
REPO = Path(__file__).resolve().parents[1]
DEMO_IMAGE = REPO / "cli" / "assets" / "demo.png"
WORDS = ("river stone market window garden letter winter engine silver orange planet music doctor "
         "village mirror castle forest bridge island candle").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_text(tokenizer, n_tokens: int, seed: int) -> str:
    """An instruction that trained weights answer at length, then pseudo-random words, cut to
    `n_tokens` tokens of the bundle's tokenizer (the GGUF has the same)."""
    words = np.random.default_rng(seed).choice(WORDS, n_tokens).tolist()
    text = f"Request {seed}. Write a long story that uses each of these words in turn: " + " ".join(words)
    ids = tokenizer.encode(text).ids[:n_tokens]
    return tokenizer.decode(ids)


class Server:
    """A server subprocess; `url` once /v1/models answers."""

    def __init__(self, argv: list[str], port: int, name: str, timeout_s: float = 600):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serving-{name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} ended (see {self.log.name})")
            try:
                r = httpx.get(f"{self.url}/v1/models", timeout=2)
                if r.status_code == 200:
                    self.model = r.json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come up in {timeout_s} s")
            time.sleep(0.5)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores used by processes other than this one and the server during a run."""

    def __init__(self, server_pid: int):
        self.pid = server_pid

    def __enter__(self):
        self.t0, self.busy0 = time.perf_counter(), _machine_busy_s()
        self.own0, self.server0 = _own_cpu_s(), _process_cpu_s(self.pid)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        ours = (_own_cpu_s() - self.own0) + (_process_cpu_s(self.pid) - self.server0)
        self.cores = max(0.0, (_machine_busy_s() - self.busy0 - ours) / wall) if wall > 0 else 0.0
        self.server_cores = (_process_cpu_s(self.pid) - self.server0) / wall if wall > 0 else 0.0


def stream_one(client, model: str, content, max_tokens: int, out: list, start: threading.Barrier) -> None:
    start.wait()
    t0 = time.perf_counter()
    stamps = []
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:  # a token (or a few, held back as one text)
            stamps.append(time.perf_counter())
    out.append((t0, stamps))


def run_clients(server: Server, contents: list, max_tokens: int) -> dict:
    import openai

    n = len(contents)
    clients = [openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=1800)
               for _ in range(n)]
    results: list = []
    barrier = threading.Barrier(n)
    threads = [threading.Thread(target=stream_one, args=(clients[i], server.model, contents[i], max_tokens,
                                                         results, barrier)) for i in range(n)]
    with OtherLoad(server.proc.pid) as load:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return summarize(results, load.cores)


def summarize(results: list, foreign_cores: float) -> dict:
    streams = [(t0, s) for t0, s in results if len(s) >= 2]
    start = min(t0 for t0, _ in results)
    first, last = max(s[0] for _, s in streams), min(s[-1] for _, s in streams)
    together = sum(sum(first < t <= last for t in s) for _, s in streams)
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for _, s in streams]
    gaps = [b - a for _, s in streams for a, b in zip(s, s[1:], strict=False)]
    return {"streams": len(results), "tokens": sum(len(s) for _, s in results),
            "aggregate_decode_tok_s": round(together / (last - first), 2) if last > first and together else None,
            "output_tok_s": round(sum(len(s) for _, s in results) / (max(s[-1] for _, s in streams) - start), 2),
            "tpot_p50_ms": round(1000 * float(np.percentile(tpot, 50)), 1),
            "tpot_p95_ms": round(1000 * float(np.percentile(tpot, 95)), 1),
            "gap_p95_ms": round(1000 * float(np.percentile(gaps, 95)), 1),
            "ttft_p50_s": round(statistics.median(s[0] - t0 for t0, s in results if s), 2),
            "other_processes_cores": round(foreign_cores, 2)}


def measure(servers: list[tuple[Server, str | None, list[int]]], prompts: list[str], max_tokens: int,
            rounds: int) -> list:
    """Rows for each (server, image or None, client counts). Every round runs each server's counts,
    servers and counts in alternating order; per row, each figure's median over the rounds."""
    runs: dict[tuple[int, int], list[dict]] = {}
    k = 0
    for server, image, _ in servers:
        run_clients(server, [_content(prompts[k], image)], 4)  # warm-up (first-run allocations)
        k += 1
    plan = [(i, n) for i, (_, _, counts) in enumerate(servers) for n in counts]
    for r in range(rounds):
        for i, n in plan if r % 2 == 0 else plan[::-1]:
            server, image, _ = servers[i]
            contents = [_content(prompts[(k + j) % len(prompts)], image) for j in range(n)]
            k += n
            runs.setdefault((i, n), []).append(run_clients(server, contents, max_tokens))
            log.info("%s, %d clients, image %s: %s", server.name, n, image is not None, runs[i, n][-1])
    return [{"server": servers[i][0].name, "image": servers[i][1] is not None, "clients": n, "rounds": len(rs),
             **{key: _median([x[key] for x in rs]) for key in rs[0]}} for (i, n), rs in runs.items()]


def _median(values: list):
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def _content(text: str, image: str | None):
    if image is None:
        return text
    return [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]


def table(rows: list[dict]) -> str:
    out = ["| server | image | clients | aggregate decode tok/s | output tok/s | TPOT p50 / p95 ms | "
           "token gap p95 ms | TTFT p50 s | other load (cores) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['server']} | {'yes' if r['image'] else 'no'} | {r['clients']} | "
                   f"{r['aggregate_decode_tok_s'] or '-'} | {r['output_tok_s']} | {r['tpot_p50_ms']} / "
                   f"{r['tpot_p95_ms']} | {r['gap_p95_ms']} | {r['ttft_p50_s']} | {r['other_processes_cores']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--gguf", type=Path, help="a GGUF of the same weights for llama.cpp's server")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary (else llama-cpp-python's)")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--image-clients", default="1,4", help="client counts for the requests with an image ('' none)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    setup_logging()
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from tokenizers import Tokenizer

    from minicpmo.runtime.bench import header

    counts = [int(c) for c in a.clients.split(",")]
    image_counts = [int(c) for c in a.image_clients.split(",") if c]
    tokenizer = Tokenizer.from_file(str(a.bundle / "tokenizer.json"))
    n_servers = 2 if a.gguf else 1  # no prompt twice: no prefix reuse
    n_prompts = a.rounds * (n_servers * sum(counts) + sum(image_counts)) + 3
    prompts = [prompt_text(tokenizer, a.prompt_tokens, seed) for seed in range(n_prompts)]
    image = "data:image/png;base64," + base64.b64encode(DEMO_IMAGE.read_bytes()).decode()
    context = a.prompt_tokens + a.max_tokens + 1024  # room for the image's tokens
    servers: list[Server] = []
    try:
        servers.append(Server([sys.executable, "-m", "minicpmo.cli.main", "serve", "--model", str(a.bundle),
                               "--port", str(port := free_port()), "--parallel", str(a.parallel), "--threads",
                               str(a.threads), "--context", str(context), "--max-queue", "64"],
                              port, f"minicpmo --parallel {a.parallel}"))
        plan = [(servers[0], None, counts)] + ([(servers[0], image, image_counts)] if image_counts else [])
        if a.gguf and a.llama_server:
            # -c is the context of all slots together: each slot gets ours' per-slot context
            servers.append(Server([str(a.llama_server), "-m", str(a.gguf), "--port", str(port := free_port()),
                                   "--parallel", str(a.parallel), "-c", str(context * a.parallel), "-t",
                                   str(a.threads), "-tb", str(a.threads), "--no-webui"],
                                  port, f"llama-server --parallel {a.parallel}"))
            plan.append((servers[-1], None, counts))
        elif a.gguf:
            servers.append(Server([sys.executable, "-m", "llama_cpp.server", "--model", str(a.gguf), "--port",
                                   str(port := free_port()), "--n_threads", str(a.threads), "--n_threads_batch",
                                   str(a.threads), "--n_ctx", str(context)], port, "llama-cpp-python server"))
            plan.append((servers[-1], None, counts))
        rows = measure(plan, prompts, a.max_tokens, a.rounds)
    finally:
        for server in servers:
            server.close()
    result = {"host": header(a.threads), "args": {k: str(v) for k, v in vars(a).items()},
              "rows": rows}
    print(json.dumps(result, indent=1) if a.json else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
