"""One decode step's attention on the CPU, for every layer of a model: GroupQueryAttention (what the
decoder uses) against the alternatives, with each layer's cache in its own buffer.

Per-layer buffers matter. A one-layer loop re-reads the same K and V, which then sit in the L2/L3
caches (a 7B layer at 2k tokens holds 8 MiB of K+V; this CPU has 32 MiB of L3): kernels that are
slow on DRAM look fast there. `--layers 28` (the default) runs 28 independent attention blocks in one
graph, so one step streams 28 layers' caches from memory as the decoder does; `--layers 1` is the
cache-hot setting (RESULTS.md §1's corrected one-layer figures).

Kernels, all at S = 1 with rotary inside:
- `GroupQueryAttention float32`: the decoder's node (one shared [1, kv, M, d] buffer written in place);
- `GroupQueryAttention float16`: the same with q/k/v cast to fp16 at its edges (the GPU variant's cache);
- `GroupQueryAttention int8`: ORT's `kv_cache_bit_width=8` with static per-channel scales;
- `batched ops`: a drop-in replacement in plain ops over a position-major [M, kv, d] cache that
  IOBinding slices without a copy: the past is bound as a [P, kv, d] view of the buffer, the new
  row's K and V are graph outputs bound at row P of the same buffer, and attention is
  FusedMatMul(q, K^T) per KV group (the group's query heads as M rows) over past and new rows,
  one Softmax, FusedMatMul(p, V). Its output is checked against numpy before it is timed.

    python -m benchmarks.attention [--heads 28 --kv-heads 4] [--lengths 512,2048,4000] [--layers 28]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

MAX_LEN = 4608
MS = "com.microsoft"


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    g = helper.make_graph(nodes, "attention", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])


def gqa_model(heads: int, kv_heads: int, head_dim: int, dtype: type, layers: int):
    from onnx import TensorProto as T
    from onnx import helper

    ot = T.FLOAT16 if dtype == np.float16 else T.FLOAT  # activations
    ct = {np.float32: T.FLOAT, np.float16: T.FLOAT16, np.int8: T.INT8}[dtype]  # the cache
    nodes, qkv = [], "qkv"
    if ot != T.FLOAT:
        nodes.append(helper.make_node("Cast", ["qkv"], ["qkv16"], to=ot))
        qkv = "qkv16"
    quant = {}
    if ct == T.INT8:
        quant = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
    kv = [1, kv_heads, MAX_LEN, head_dim]
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, (heads + 2 * kv_heads) * head_dim]),
              helper.make_tensor_value_info("sl", T.INT32, [1]), helper.make_tensor_value_info("tl", T.INT32, []),
              helper.make_tensor_value_info("cos", ot, [MAX_LEN, head_dim // 2]),
              helper.make_tensor_value_info("sin", ot, [MAX_LEN, head_dim // 2])]
    if ct == T.INT8:
        inputs += [helper.make_tensor_value_info(n, T.FLOAT, [1, kv_heads, 1, head_dim]) for n in ("ks", "vs")]
    outputs = []
    for i in range(layers):
        args = [qkv, "", "", f"pk{i}", f"pv{i}", "sl", "tl", "cos", "sin"]
        if ct == T.INT8:
            args += ["", "", "", "ks", "vs"]
        out = f"o{i}" if ot == T.FLOAT else f"o16_{i}"
        nodes.append(helper.make_node(
            "GroupQueryAttention", args, [out, f"prk{i}", f"prv{i}"], domain=MS, num_heads=heads,
            kv_num_heads=kv_heads, do_rotary=1, scale=head_dim ** -0.5, **quant))
        if ot != T.FLOAT:
            nodes.append(helper.make_node("Cast", [out], [f"o{i}"], to=T.FLOAT))
        inputs += [helper.make_tensor_value_info(f"pk{i}", ct, kv), helper.make_tensor_value_info(f"pv{i}", ct, kv)]
        outputs += [helper.make_tensor_value_info(f"o{i}", T.FLOAT, None),
                    helper.make_tensor_value_info(f"prk{i}", ct, kv), helper.make_tensor_value_info(f"prv{i}", ct, kv)]
    return _model(nodes, inputs, outputs)


def batched_model(heads: int, kv_heads: int, head_dim: int, layers: int, cos: np.ndarray, sin: np.ndarray):
    """Plain-op attention over position-major cache views; S = 1 (decode), so no causal mask."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    group = heads // kv_heads

    def i64(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    inits = [numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin"),
             i64("qk_v", [(heads + kv_heads) * head_dim, kv_heads * head_dim]),
             i64("q_k", [heads * head_dim, kv_heads * head_dim]), i64("row", [1, kv_heads, head_dim]),
             i64("groups", [kv_heads, group, head_dim]), i64("flat", [1, 1, heads * head_dim]), i64("one", [1])]
    nodes = [helper.make_node("Shape", ["pk0"], ["past"], start=0, end=1),  # P, the past length
             helper.make_node("Concat", ["past", "one"], ["split_pn"], axis=0)]
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, (heads + 2 * kv_heads) * head_dim])]
    outputs = []
    for i in range(layers):
        def t(name, i=i):  # this layer's intermediate
            return f"l{i}/{name}"

        def node(op, ins, outs, **kw):
            nodes.append(helper.make_node(op, ins, outs, **kw))

        pk, pv, nk, nv = f"pk{i}", f"pv{i}", f"nk{i}", f"nv{i}"
        node("Split", ["qkv", "qk_v"], [t("qk"), t("v")], axis=2)
        node("RotaryEmbedding", [t("qk"), "past", "cos", "sin"], [t("qk_rot")], domain=MS, num_heads=heads + kv_heads)
        node("Split", [t("qk_rot"), "q_k"], [t("q"), t("k")], axis=2)
        node("Reshape", [t("k"), "row"], [nk])  # bound at row P of the K buffer: the in-place write
        node("Reshape", [t("v"), "row"], [nv])
        node("Reshape", [t("q"), "groups"], [t("q3")])  # [kv, G, d]: one GEMM of M = G rows per KV head
        node("FusedMatMul", [t("q3"), pk], [t("s_past")], domain=MS, transB=1, transBatchB=1, alpha=head_dim ** -0.5)
        node("FusedMatMul", [t("q3"), nk], [t("s_new")], domain=MS, transB=1, transBatchB=1, alpha=head_dim ** -0.5)
        node("Concat", [t("s_past"), t("s_new")], [t("s")], axis=-1)
        node("Softmax", [t("s")], [t("probs")], axis=-1)
        node("Split", [t("probs"), "split_pn"], [t("p_past"), t("p_new")], axis=-1)
        node("FusedMatMul", [t("p_past"), pv], [t("o_past")], domain=MS, transBatchB=1)
        node("FusedMatMul", [t("p_new"), nv], [t("o_new")], domain=MS, transBatchB=1)
        node("Add", [t("o_past"), t("o_new")], [t("o3")])
        node("Reshape", [t("o3"), "flat"], [f"o{i}"])
        inputs += [helper.make_tensor_value_info(f"pk{i}", T.FLOAT, ["P", kv_heads, head_dim]),
                   helper.make_tensor_value_info(f"pv{i}", T.FLOAT, ["P", kv_heads, head_dim])]
        outputs += [helper.make_tensor_value_info(f"o{i}", T.FLOAT, None),
                    helper.make_tensor_value_info(f"nk{i}", T.FLOAT, [1, kv_heads, head_dim]),
                    helper.make_tensor_value_info(f"nv{i}", T.FLOAT, [1, kv_heads, head_dim])]
    return _model(nodes, inputs, outputs, inits)


def reference_attention(qkv: np.ndarray, k_past: np.ndarray, v_past: np.ndarray, position: int,
                        cos: np.ndarray, sin: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """numpy: rotate-half RoPE at `position`, then softmax(q K^T / sqrt(d)) V over past + new rows."""
    d = k_past.shape[-1]
    x = qkv.reshape(heads + 2 * kv_heads, d).astype(np.float64)
    c, s = cos[position].astype(np.float64), sin[position].astype(np.float64)
    h = d // 2
    qk = x[:heads + kv_heads]
    qk = np.concatenate([qk[:, :h] * c - qk[:, h:] * s, qk[:, h:] * c + qk[:, :h] * s], axis=1)
    q, k_new, v_new = qk[:heads], qk[heads:], x[heads + kv_heads:]
    keys = np.concatenate([k_past, k_new[None]], axis=0)  # [P+1, kv, d]
    values = np.concatenate([v_past, v_new[None]], axis=0)
    out = np.empty((heads, d))
    for head in range(heads):
        g = head // (heads // kv_heads)
        scores = keys[:, g] @ q[head] / np.sqrt(d)
        w = np.exp(scores - scores.max())
        out[head] = (w / w.sum()) @ values[:, g]
    return out.reshape(-1)


def _median_us(run, runs: int = 20, repeats: int = 7) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            run()
        times.append((time.perf_counter() - t) / runs)
    return float(np.median(times) * 1e6)


def measure(heads: int, kv_heads: int, head_dim: int, lengths: list[int], threads: int, layers: int) -> list[dict]:
    import onnxruntime as ort

    rng, rows = np.random.default_rng(0), []
    qkv = rng.standard_normal((1, 1, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    cos, sin = (rng.standard_normal((MAX_LEN, head_dim // 2)).astype(np.float32) for _ in range(2))
    for dtype in (np.float32, np.float16, np.int8):
        s = _session(gqa_model(heads, kv_heads, head_dim, dtype, layers), threads)
        scale = 40 if dtype == np.int8 else 1
        caches = [tuple(ort.OrtValue.ortvalue_from_numpy(
            (rng.standard_normal((1, kv_heads, MAX_LEN, head_dim)) * scale).astype(dtype)) for _ in range(2))
            for _ in range(layers)]
        act = np.float16 if dtype == np.float16 else np.float32
        for n in lengths:
            b = s.io_binding()
            b.bind_cpu_input("qkv", qkv)
            b.bind_cpu_input("sl", np.array([n - 1], np.int32))
            b.bind_cpu_input("tl", np.array(n, np.int32))
            b.bind_cpu_input("cos", cos.astype(act))
            b.bind_cpu_input("sin", sin.astype(act))
            if dtype == np.int8:
                for name in ("ks", "vs"):
                    b.bind_cpu_input(name, np.full((1, kv_heads, 1, head_dim), 0.02, np.float32))
            for i, (pk, pv) in enumerate(caches):
                b.bind_ortvalue_input(f"pk{i}", pk)
                b.bind_ortvalue_input(f"pv{i}", pv)
                b.bind_ortvalue_output(f"prk{i}", pk)
                b.bind_ortvalue_output(f"prv{i}", pv)
                b.bind_output(f"o{i}")
            us = _median_us(lambda: s.run_with_iobinding(b)) / layers  # noqa: B023 (b is used at once)
            rows.append({"kernel": f"GroupQueryAttention {np.dtype(dtype).name}", "length": n, "us": us})
        del caches
    s = _session(batched_model(heads, kv_heads, head_dim, layers, cos, sin), threads)
    caches = [tuple(rng.standard_normal((MAX_LEN, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
              for _ in range(layers)]
    row_bytes = kv_heads * head_dim * 4
    out0 = np.empty((1, 1, heads * head_dim), np.float32)
    for n in lengths:
        past = n - 1
        b = s.io_binding()
        b.bind_cpu_input("qkv", qkv)

        def bind(b=b, past=past):
            # What a runtime would do each step: the views move with the length.
            for i, (k, v) in enumerate(caches):
                for name, buf in ((f"pk{i}", k), (f"pv{i}", v)):
                    b.bind_input(name, "cpu", 0, np.float32, [past, kv_heads, head_dim], buf.ctypes.data)
                for name, buf in ((f"nk{i}", k), (f"nv{i}", v)):
                    b.bind_output(name, "cpu", 0, np.float32, [1, kv_heads, head_dim], buf.ctypes.data + past * row_bytes)
                if i:
                    b.bind_output(f"o{i}")
            b.bind_output("o0", "cpu", 0, np.float32, list(out0.shape), out0.ctypes.data)

        bind()
        s.run_with_iobinding(b)
        k, v = caches[0]
        want = reference_attention(qkv, k[:past], v[:past], past, cos, sin, heads, kv_heads)
        got = out0.reshape(-1)
        if not np.allclose(got, want, atol=1e-4, rtol=1e-3):
            raise AssertionError(f"batched attention differs from numpy by {np.abs(got - want).max():.2e}")
        us = _median_us(lambda: (bind(), s.run_with_iobinding(b))) / layers  # noqa: B023
        rows.append({"kernel": "batched ops float32", "length": n, "us": us})
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
    p.add_argument("--layers", type=int, default=28, help="independent layers per step (1 = cache-hot)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    rows = measure(a.heads, a.kv_heads, a.head_dim, [int(x) for x in a.lengths.split(",")], a.threads, a.layers)
    print(f"| kernel ({a.heads} heads, {a.kv_heads} KV heads, {a.layers} layers, {a.threads} threads) "
          "| context | us per layer | K+V read GB/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['length']} | {r['us']:.0f} | {r['effective_gb_s']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
