"""One decode step's attention on the CPU: GroupQueryAttention (what the decoder uses) against plain ops.

GroupQueryAttention as the decoder graph calls it (S = 1, rotary inside, the KV cache one shared
buffer written in place), in fp32, in fp16 (q/k/v cast at its edges) and with an int8 cache (ORT's
kv_cache_bit_width=8, static per-channel scales, which would need calibration), against the same
attention in plain batched ops over an already-sliced cache: FusedMatMul(q, K^T) -> Softmax ->
MatMul(V), the query heads of one KV group as the M = G rows of one GEMM. The plain form leaves out
rotary (for one token: the q and k rows only, not the cache) and the in-place cache write, and needs
a contiguous [kv, L, d] cache: it measures what the kernel leaves on the table, it is not a
drop-in replacement.

    python -m benchmarks.attention [--heads 28 --kv-heads 4] [--lengths 512,2048,4000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MAX_LEN = 4608


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def gqa_model(heads: int, kv_heads: int, head_dim: int, dtype: type):
    from onnx import TensorProto as T
    from onnx import helper

    ot = T.FLOAT16 if dtype == np.float16 else T.FLOAT  # activations
    ct = {np.float32: T.FLOAT, np.float16: T.FLOAT16, np.int8: T.INT8}[dtype]  # the cache
    nodes, qkv, out = [], "qkv", "o"
    if ot != T.FLOAT:
        nodes.append(helper.make_node("Cast", ["qkv"], ["qkv16"], to=ot))
        qkv, out = "qkv16", "o16"
    inputs, quant = [qkv, "", "", "pk", "pv", "sl", "tl", "cos", "sin"], {}
    if ct == T.INT8:
        inputs += ["", "", "", "ks", "vs"]
        quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    nodes.append(helper.make_node(
        "GroupQueryAttention", inputs, [out, "prk", "prv"], domain="com.microsoft", num_heads=heads,
        kv_num_heads=kv_heads, do_rotary=1, scale=head_dim ** -0.5, **quant))
    if ot != T.FLOAT:
        nodes.append(helper.make_node("Cast", ["o16"], ["o"], to=T.FLOAT))
    kv = [1, kv_heads, MAX_LEN, head_dim]
    scales = [helper.make_tensor_value_info(n, T.FLOAT, [1, kv_heads, 1, head_dim]) for n in ("ks", "vs")]
    g = helper.make_graph(nodes, "gqa", [
        helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, (heads + 2 * kv_heads) * head_dim]),
        helper.make_tensor_value_info("pk", ct, kv), helper.make_tensor_value_info("pv", ct, kv),
        helper.make_tensor_value_info("sl", T.INT32, [1]), helper.make_tensor_value_info("tl", T.INT32, []),
        helper.make_tensor_value_info("cos", ot, [MAX_LEN, head_dim // 2]),
        helper.make_tensor_value_info("sin", ot, [MAX_LEN, head_dim // 2]),
        *(scales if ct == T.INT8 else [])], [
        helper.make_tensor_value_info("o", T.FLOAT, None), helper.make_tensor_value_info("prk", ct, kv),
        helper.make_tensor_value_info("prv", ct, kv)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def plain_model(heads: int, kv_heads: int, head_dim: int, length: int):
    from onnx import TensorProto as T
    from onnx import helper

    group = heads // kv_heads
    nodes = [helper.make_node("FusedMatMul", ["q", "k"], ["s"], domain="com.microsoft", transB=1,
                              alpha=head_dim ** -0.5),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]
    g = helper.make_graph(nodes, "plain", [
        helper.make_tensor_value_info("q", T.FLOAT, [1, kv_heads, group, head_dim]),
        helper.make_tensor_value_info("k", T.FLOAT, [1, kv_heads, length, head_dim]),
        helper.make_tensor_value_info("v", T.FLOAT, [1, kv_heads, length, head_dim])],
        [helper.make_tensor_value_info("o", T.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _median_us(session, binding, runs: int = 50, repeats: int = 7) -> float:
    for _ in range(20):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            session.run_with_iobinding(binding)
        times.append((time.perf_counter() - t) / runs)
    return float(np.median(times) * 1e6)


def measure(heads: int, kv_heads: int, head_dim: int, lengths: list[int], threads: int) -> list[dict]:
    import onnxruntime as ort

    rng, rows = np.random.default_rng(0), []
    for dtype in (np.float32, np.float16, np.int8):
        s = _session(gqa_model(heads, kv_heads, head_dim, dtype), threads)
        cache = rng.standard_normal((1, kv_heads, MAX_LEN, head_dim)) * (40 if dtype == np.int8 else 1)
        pk, pv = (ort.OrtValue.ortvalue_from_numpy(cache.astype(dtype)) for _ in range(2))
        act = np.float16 if dtype == np.float16 else np.float32
        cos, sin = (rng.standard_normal((MAX_LEN, head_dim // 2)).astype(act) for _ in range(2))
        for n in lengths:
            b = s.io_binding()
            b.bind_cpu_input("qkv", rng.standard_normal((1, 1, (heads + 2 * kv_heads) * head_dim)).astype(np.float32))
            b.bind_ortvalue_input("pk", pk)
            b.bind_ortvalue_input("pv", pv)
            b.bind_cpu_input("sl", np.array([n - 1], np.int32))
            b.bind_cpu_input("tl", np.array(n, np.int32))
            b.bind_cpu_input("cos", cos)
            b.bind_cpu_input("sin", sin)
            if dtype == np.int8:
                for name in ("ks", "vs"):
                    b.bind_cpu_input(name, np.full((1, kv_heads, 1, head_dim), 0.02, np.float32))
            b.bind_output("o")
            b.bind_ortvalue_output("prk", pk)
            b.bind_ortvalue_output("prv", pv)
            rows.append({"kernel": f"GroupQueryAttention {np.dtype(dtype).name}", "length": n, "us": _median_us(s, b)})
    for n in lengths:
        s = _session(plain_model(heads, kv_heads, head_dim, n), threads)
        b = s.io_binding()
        shapes = {"q": (1, kv_heads, heads // kv_heads, head_dim), "k": (1, kv_heads, n, head_dim),
                  "v": (1, kv_heads, n, head_dim)}
        for name, shape in shapes.items():
            b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32)))
        b.bind_output("o")
        rows.append({"kernel": "plain ops float32", "length": n, "us": _median_us(s, b)})
    for r in rows:  # K and V read once each, in the cache's dtype
        width = 1 if "int8" in r["kernel"] else 2 if "float16" in r["kernel"] else 4
        r["effective_gb_s"] = 2 * kv_heads * r["length"] * head_dim * width / r["us"] / 1e3
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n")[0])
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--lengths", default="512,2048,4000")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    rows = measure(a.heads, a.kv_heads, a.head_dim, [int(x) for x in a.lengths.split(",")], a.threads)
    print(f"| kernel ({a.heads} heads, {a.kv_heads} KV heads, {a.threads} threads) | context | us per layer | K+V read GB/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['length']} | {r['us']:.0f} | {r['effective_gb_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
