"""Memory read bandwidth of this machine, and the decode ceiling it implies.

Decode of one token reads every decoder weight once (all layers and the lm_head; of the embedding
table only one row) plus the KV cache up to the current length, so

    ceiling tok/s = read bandwidth / (weight bytes read per token + KV bytes at that length).

Bandwidth is a float32 max-reduction over a large array, split across `threads` Python threads
(numpy releases the GIL inside it, so the threads run in parallel). Not np.sum: its pairwise float32
summation is compute-bound here (~24 GB/s) and keeps the GIL, so it neither saturates nor scales.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def read_bandwidth(threads: int, gib: float = 2.0, repeats: int = 5) -> dict:
    """Bytes per second read by a `threads`-way float32 max over `gib` GiB: best and median."""
    n = int(gib * (1 << 30)) // 4
    data = np.ones(n, dtype=np.float32)  # written once, so every page is resident before timing
    parts = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats + 1):  # the first pass warms the pool and the TLB
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            rates.append(data.nbytes / (time.perf_counter() - t0))
    rates = rates[1:]
    return {"threads": threads, "array_bytes": data.nbytes, "best_bytes_per_s": max(rates),
            "median_bytes_per_s": statistics.median(rates)}


def ceiling_tok_s(bandwidth_bytes_per_s: float, weight_bytes_per_token: int, kv_bytes: float) -> float:
    return bandwidth_bytes_per_s / (weight_bytes_per_token + kv_bytes)
