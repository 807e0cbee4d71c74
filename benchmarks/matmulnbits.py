"""One MatMulNBits node, one token (M = 1): effective read bandwidth of the weight per variant; and,
with `--rows`, what M rows (a batched decode step's sequences) cost against one.

    python -m benchmarks.matmulnbits [--threads 2] [--shape 1536x8960 ...] [--json]
    python -m benchmarks.matmulnbits --rows 1,2,4,8 [--block 128] [--shape ...]

Variants: block size 32/128, asymmetric (uint4 + zero points, what our exporter writes) or
symmetric (no zero points, what onnxruntime-genai's builder and llama.cpp's Q4_0 write), int4/int8.
`--rows`: the exporter's variant (zero points, accuracy level 4; `--bits 4|8`) as a chain of copies of the
weight totalling >= 256 MB, so each run reads them from memory as a model's decode step does (one
node's weight would stay in the last-level cache and time the arithmetic alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

SHAPES_1_5B = ((1536, 2048), (1536, 1536), (1536, 17920), (8960, 1536), (1536, 151700))  # K x N
VARIANTS = ((4, 32, False), (4, 32, True), (4, 128, False), (4, 128, True), (8, 32, False), (8, 32, True))


def quantize(w_kn: np.ndarray, bits: int, block: int, symmetric: bool):
    """ORT's own packing routine; W given as the MatMul B matrix [K, N]."""
    from onnxruntime.capi import _pybind_state as ort_c

    k, n = w_kn.shape
    blocks = (k + block - 1) // block
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n * blocks,), np.float32)
    zp = np.zeros((n * ((blocks * bits + 7) // 8),), np.uint8)
    fn = ort_c.quantize_matmul_4bits if bits == 4 else ort_c.quantize_matmul_8bits
    fn(packed, np.ascontiguousarray(w_kn), scales, zp, block, n, k, symmetric)
    return packed, scales, None if symmetric else zp


def session(k: int, n: int, bits: int, block: int, symmetric: bool, threads: int, acc: int = 4, copies: int = 1):
    """A graph of `copies` MatMulNBits nodes on one input, each with its own copy of the weight."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) / np.sqrt(k)
    packed, scales, zp = quantize(w, bits, block, symmetric)
    inits, nodes = [], []
    for c in range(copies):
        # each copy's bytes differ (rotated codes): ONNX Runtime shares identical initializers, and
        # one shared weight would be read from the cache
        codes = np.roll(packed, c, axis=0) if c else packed
        inits += [numpy_helper.from_array(codes, f"B{c}"), numpy_helper.from_array(scales, f"S{c}")]
        inputs = ["A", f"B{c}", f"S{c}"]
        if zp is not None:
            inits.append(numpy_helper.from_array(zp, f"Z{c}"))
            inputs.append(f"Z{c}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"Y{c}"], domain="com.microsoft", K=k, N=n,
                                      bits=bits, block_size=block, accuracy_level=acc))
    graph = helper.make_graph(nodes, "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, ["M", n])
                               for c in range(copies)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nbytes = packed.nbytes + scales.nbytes + (zp.nbytes if zp is not None else 0)
    return sess, nbytes * copies


def measure(k: int, n: int, bits: int, block: int, symmetric: bool, threads: int, runs: int) -> dict:
    sess, nbytes = session(k, n, bits, block, symmetric, threads)
    a = {"A": np.random.default_rng(1).standard_normal((1, k), dtype=np.float32)}
    for _ in range(5):
        sess.run(None, a)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, a)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"K": k, "N": n, "bits": bits, "block": block, "symmetric": symmetric, "weight_bytes": nbytes,
            "median_us": round(t * 1e6, 1), "gb_per_s": round(nbytes / t / 1e9, 1)}


def row_scaling(k: int, n: int, bits: int, block: int, rows: list[int], threads: int, runs: int) -> list[dict]:
    """Median time of M rows through >= 256 MB of weight copies, for each M, in alternating rounds."""
    one = k * n * bits // 8 + (k // block) * n * 5
    copies = max(1, -(-256_000_000 // one))
    sess, nbytes = session(k, n, bits, block, False, threads, copies=copies)
    inputs = {m: {"A": np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)} for m in rows}
    times: dict[int, list[float]] = {m: [] for m in rows}
    for m in rows:
        sess.run(None, inputs[m])
    for r in range(runs):
        for m in rows if r % 2 == 0 else rows[::-1]:
            t0 = time.perf_counter()
            sess.run(None, inputs[m])
            times[m].append(time.perf_counter() - t0)
    base = statistics.median(times[rows[0]])
    return [{"K": k, "N": n, "bits": bits, "block": block, "copies": copies, "weight_bytes": nbytes, "rows": m,
             "median_ms": round(statistics.median(times[m]) * 1e3, 2),
             "x_first": round(statistics.median(times[m]) / base, 2)} for m in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matmulnbits", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--shape", action="append", help="KxN (repeatable) [the Qwen2.5-1.5B shapes]")
    p.add_argument("--rows", help="comma list of row counts M: time M rows against the first (batched decode)")
    p.add_argument("--block", type=int, default=128, help="with --rows: the block size")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="with --rows: the weight bits")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shape] if a.shape else SHAPES_1_5B
    from .common import wait_for_quiet

    if a.rows:
        from minicpmo.runtime.bench import header

        counts = [int(x) for x in a.rows.split(",")]
        rows = []
        for k, n in shapes:
            wait_for_quiet("matmulnbits")
            rows += row_scaling(k, n, a.bits, a.block, counts, a.threads, max(5, a.runs // 5))
            print(json.dumps(rows[-len(counts):]), file=sys.stderr)
        if a.json:
            print(json.dumps({"host": header(a.threads), "rows": rows}, indent=2))
            return 0
        print("| K x N | bits | block | weight copies (MB) | rows M | median ms | × M = 1 |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['K']}x{r['N']} | {r['bits']} | {r['block']} | {r['copies']} ({r['weight_bytes'] / 1e6:.0f}) | "
                  f"{r['rows']} | {r['median_ms']} | {r['x_first']} |")
        return 0

    rows = []
    for k, n in shapes:
        for bits, block, sym in VARIANTS:
            wait_for_quiet("matmulnbits")
            rows.append(measure(k, n, bits, block, sym, a.threads, a.runs))
            print(json.dumps(rows[-1]), file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("| K x N | bits | block | zero points | weight MB | median µs | GB/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']}x{r['N']} | {r['bits']} | {r['block']} | {'no' if r['symmetric'] else 'yes'} | "
              f"{r['weight_bytes'] / 1e6:.1f} | {r['median_us']:.0f} | {r['gb_per_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
