"""Memory read bandwidth of this machine, and the decode ceiling it implies.

Decode of one token reads every decoder weight once (all layers and the lm_head; of the embedding
table only one row) plus the KV cache up to the current length, so (benchmarks/report.py)

    ceiling tok/s = read bandwidth / (weight bytes read per token + KV bytes at that length).

Bandwidth is a max-reduction over a large array, split across `threads` Python threads (numpy
releases the GIL inside it, so the threads run in parallel). Not np.sum: its pairwise float32
summation is compute-bound here (~24 GB/s) and keeps the GIL, so it neither saturates nor scales.
This machine's bandwidth is shared with other virtual machines and drifts (38 to 52 GB/s within an
hour): each peer's ceiling uses a probe taken just before and just after its own measurement.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(threads: int, gib: float = 2.0, repeats: int = 5) -> dict:
    """Bytes per second read by `threads` threads reducing `gib` GiB (max over float32 and over an
    int64 view; each reaches a slightly different speed): best and median of all passes."""
    n = int(gib * (1 << 30)) // 8 * 2
    data = np.ones(n, dtype=np.float32)  # written once, so every page is resident before timing
    rates = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for view in (data, data.view(np.int64)):
            parts = np.array_split(view, threads)
            for _ in range(repeats + 1):  # the first pass warms the pool and the TLB
                t0 = time.perf_counter()
                list(pool.map(np.max, parts))
                rates.append(data.nbytes / (time.perf_counter() - t0))
            del rates[-repeats - 1]
    return {"threads": threads, "array_bytes": data.nbytes, "best_bytes_per_s": max(rates),
            "median_bytes_per_s": statistics.median(rates)}

