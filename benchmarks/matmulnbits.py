"""One MatMulNBits node, one token (M = 1): effective read bandwidth of the weight per variant.

    python -m benchmarks.matmulnbits [--threads 2] [--shape 1536x8960 ...] [--json]

Variants: block size 32/128, asymmetric (uint4 + zero points, what our exporter writes) or
symmetric (no zero points, what onnxruntime-genai's builder and llama.cpp's Q4_0 write), int4/int8.
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


def session(k: int, n: int, bits: int, block: int, symmetric: bool, threads: int, acc: int = 4):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) / np.sqrt(k)
    packed, scales, zp = quantize(w, bits, block, symmetric)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=acc)
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nbytes = packed.nbytes + scales.nbytes + (zp.nbytes if zp is not None else 0)
    return sess, nbytes


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matmulnbits", description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--shape", action="append", help="KxN (repeatable) [the Qwen2.5-1.5B shapes]")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shape] if a.shape else SHAPES_1_5B
    from .common import wait_for_quiet

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
