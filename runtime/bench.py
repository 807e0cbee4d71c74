"""`minicpmo bench`: the speed of one bundle on this machine, medians over repeats.

Measured with the same objects the pipeline uses (Decoder, VisionEncoder), so the figures are the
product's, not a kernel micro-benchmark. Peak RSS is the process's high-water mark (ru_maxrss).
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from .pipeline import Pipeline
from .types import GenerationParams

# The time-to-first-token prompt (one 448² image, a question, the chat template) is ~105 tokens: the
# cache has room for it whatever --prompt-tokens says.
TTFT_PROMPT_ROOM = 256


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _test_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bundle_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def header(threads: int | None) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "processor": _cpu_name(), "isa": isa(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__, "threads": threads}


def isa() -> str:
    """The x86 vector extensions that pick ONNX Runtime's and llama.cpp's kernels (AVX-512 and
    VNNI flavours, AVX2, FMA): every speed figure depends on them."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    shown = sorted(f for f in set(flags) if f.startswith("avx512") or f in ("avx_vnni", "avx2", "fma"))
    return " ".join(shown) or "no AVX2"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_bench(model: Path, *, threads: int | None = None, repeats: int = 3, prompt_tokens: int = 512,
              decode_tokens: int = 128, provider: str = "auto", cuda_graph: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Measure load, vision, time to first token, prefill and decode speed, RSS and size."""
    result = header(threads)
    t0 = time.perf_counter()
    pipe = Pipeline.load(model, provider=provider, threads=threads, cuda_graph=cuda_graph,
                         context_length=max(prompt_tokens, TTFT_PROMPT_ROOM) + decode_tokens + 16)
    result["load_seconds"] = round(time.perf_counter() - t0, 3)
    result["provider"] = pipe.provider
    result["cuda_graph"] = pipe.decoder.cuda_graph
    log(f"loaded in {result['load_seconds']} s")

    vision = pipe.vision
    one = vision.prepare(_test_image(448, 448, 0))
    nine = vision.prepare(_test_image(1344, 1344, 1))  # 3x3 grid + the source = 10 slices
    # The first encode after loading pays once for paging the weights in and setting up: reported on
    # its own, as it would otherwise be one of the few repeats the median is taken over.
    result["vision_seconds_first_slice"] = round(_median_seconds(lambda: vision.encode(one), 1), 4)
    result["vision_seconds_per_448_slice"] = round(
        _median_seconds(lambda: vision.cache.clear() or vision.encode(one), repeats), 4)
    result["vision_seconds_9_slice_image"] = round(
        _median_seconds(lambda: vision.cache.clear() or vision.encode(nine), repeats), 4)
    result["vision_slices_9_slice_image"] = len(nine.strips)
    log(f"vision: {result['vision_seconds_per_448_slice']} s per 448x448 slice "
        f"(the first after loading: {result['vision_seconds_first_slice']} s)")

    def first_token():
        pipe.vision.cache.clear()
        pipe.kv.reset()
        msgs = [{"role": "user", "content": [{"type": "image", "image": _test_image(448, 448, 2)},
                                              {"type": "text", "text": "What is in the image?"}]}]
        gen = pipe.generate(msgs, GenerationParams(max_tokens=1))
        next(gen)
        gen.close()
    result["time_to_first_token_seconds"] = round(_median_seconds(first_token, repeats), 4)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(pipe.embed.vocab_size, 100_000), prompt_tokens)
    embeds = pipe.embed(ids)

    def prefill():
        pipe.kv.reset()
        pipe.decoder.prefill(embeds, list(range(prompt_tokens)))
    result["prefill_tokens_per_s"] = round(prompt_tokens / _median_seconds(prefill, repeats), 2)
    log(f"prefill: {result['prefill_tokens_per_s']} tok/s")

    def decode():
        pipe.kv.reset()
        logits = pipe.decoder.prefill(embeds[:16], list(range(16)))
        t = time.perf_counter()
        for i in range(decode_tokens):
            token = int(np.argmax(logits))
            logits = pipe.decoder.forward(pipe.embed(np.array([token])), [("d", i)])
        return time.perf_counter() - t
    decode_times = [decode() for _ in range(repeats)]
    result["decode_tokens_per_s"] = round(decode_tokens / statistics.median(decode_times), 2)
    log(f"decode: {result['decode_tokens_per_s']} tok/s")
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["bundle_bytes"] = bundle_bytes(model)
    result["kv_cache_bytes"] = pipe.kv.nbytes
    return result
