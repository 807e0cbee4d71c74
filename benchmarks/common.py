"""What every peer's measurement shares: the protocol, the prompt, timing and memory helpers.

Protocol (the same for every peer): one repeat = prefill a `prompt_tokens`-token prompt from an
empty cache (timed: prefill tok/s), then decode `decode_tokens` greedy tokens after it with no
early stop (timed from the first generated token's logits to the last step: decode tok/s).
Figures are medians over repeats. Speed does not depend on the weights' values, only their shapes.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("benchmarks")
PROMPT_VOCAB = 100_000  # prompt ids are drawn below this (and below the vocab size)
MAX_FOREIGN_LOAD = 0.25  # cores used by other processes during a repeat before it is redone
MAX_RETRIES = 6
RETRY_PAUSE_S = 5.0
QUIET_WAIT_S = float(os.environ.get("BENCH_QUIET_WAIT_S", 900))  # 0: do not wait


@dataclass(frozen=True)
class Protocol:
    prompt_tokens: int = 512
    decode_tokens: int = 128
    repeats: int = 3
    threads: int = 2

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.decode_tokens + 16

    @property
    def mean_decode_length(self) -> float:
        """Average number of cached positions a decode step reads."""
        return self.prompt_tokens + self.decode_tokens / 2


def prompt_ids(n: int, vocab_size: int, seed: int = 0):
    """The same pseudo-random prompt for every peer: ids [n] int64."""
    import numpy as np  # not at the top: the orchestrator imports this module and stays small

    return np.random.default_rng(seed).integers(0, min(vocab_size, PROMPT_VOCAB), n).astype(np.int64)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def summarize(proto: Protocol, prefill_s: list[float], decode_s: list[float]) -> dict:
    """Medians of the per-repeat timings as tok/s (decode counts the steps after the first token)."""
    steps = proto.decode_tokens - 1
    return {"prefill_tok_s": round(proto.prompt_tokens / statistics.median(prefill_s), 2),
            "decode_tok_s": round(steps / statistics.median(decode_s), 2),
            "prefill_seconds": [round(t, 3) for t in prefill_s],
            "decode_seconds": [round(t, 3) for t in decode_s]}


class ForeignLoad:
    """CPU time other processes used while we ran, in cores: (machine busy - this process) / wall."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        other = (_machine_busy_s() - self.busy0) - (_own_cpu_s() - self.own0)
        self.cores = max(0.0, other / wall) if wall > 0 else 0.0


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def wait_for_quiet(name: str, window_s: float = 2.0) -> float:
    """Sleep until other processes use less than MAX_FOREIGN_LOAD cores over `window_s` (at most
    QUIET_WAIT_S); returns the seconds waited."""
    waited, warned = 0.0, False
    while waited < QUIET_WAIT_S:
        with ForeignLoad() as load:
            time.sleep(window_s)
        if load.cores <= MAX_FOREIGN_LOAD:
            break
        if not warned:
            log.warning("%s: other processes use %.2f cores: waiting for a quiet machine (at most %.0f s)",
                        name, load.cores, QUIET_WAIT_S)
            warned = True
        waited += window_s
    return waited


def run_repeats(proto: Protocol, prefill: Callable[[object], object], decode: Callable[[object], None],
                name: str, setup: Callable[[], object] = lambda: None) -> dict:
    """`repeats` times: state = setup() (untimed), then prefill(state) -> s2, then decode(s2) (timed).

    A repeat during which other processes used more than MAX_FOREIGN_LOAD cores is run again
    (at most MAX_RETRIES times in all): on 2 shared cores, one busy neighbour can halve a figure."""
    prefill_s, decode_s, loads, retries = [], [], [], 0
    while len(decode_s) < proto.repeats:
        wait_for_quiet(name)
        ready = setup()
        with ForeignLoad() as load:
            t0 = time.perf_counter()
            state = prefill(ready)
            t1 = time.perf_counter()
            decode(state)
            t2 = time.perf_counter()
        log.info("%s: repeat %d/%d: prefill %.2f s, decode %.2f s, other processes %.2f cores", name,
                 len(decode_s) + 1, proto.repeats, t1 - t0, t2 - t1, load.cores)
        if load.cores > MAX_FOREIGN_LOAD and retries < MAX_RETRIES:
            retries += 1
            log.warning("%s: the machine was busy (%.2f cores used by others): repeating", name, load.cores)
            time.sleep(RETRY_PAUSE_S)
            continue
        prefill_s.append(t1 - t0)
        decode_s.append(t2 - t1)
        loads.append(round(load.cores, 2))
    return summarize(proto, prefill_s, decode_s) | {"foreign_load_cores": loads, "busy_retries": retries}


def files_bytes(paths: list[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


def kv_bytes_per_position(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * itemsize


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
