"""Where a decode step's time goes: ONNX Runtime's profiler on our decoder graph, or on an
onnxruntime-genai model folder (one with a genai_config.json) run by its own Generator.

    python -m benchmarks.profile_decode MODEL_DIR [--steps 20] [--threads 2] [--prompt-tokens 512] [--json]

Runs the prompt, then `steps` greedy decode steps with SessionOptions.enable_profiling, and splits
each step into operator groups (MatMulNBits of the layers, of the lm_head, GroupQueryAttention,
norms, the rest), ORT's own overhead (model_run minus the kernels) and the caller's (wall minus
model_run: our Python loop, or onnxruntime-genai's C++ generator).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

GROUPS = (("lm_head MatMulNBits", lambda op, name: op == "MatMulNBits" and "lm_head" in name),
          ("MatMulNBits (layers)", lambda op, name: op == "MatMulNBits"),
          ("GroupQueryAttention", lambda op, name: op == "GroupQueryAttention"),
          ("norms", lambda op, name: "LayerNorm" in op or "LayerNormalization" in op),
          ("SiLU·up (Sigmoid/Mul/...)", lambda op, name: "/act" in name or op in ("Sigmoid", "QuickGelu")),
          ("other", lambda op, name: True))


def profile_decode(bundle: Path, *, threads: int = 2, steps: int = 20, prompt_tokens: int = 512,
                   out_dir: Path | None = None) -> dict:
    """Profile one prompt and `steps` decode steps; returns the per-step breakdown (milliseconds)."""
    from .common import prompt_ids
    from .peer_ours import DecoderOnly

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="minicpmo-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    d = DecoderOnly(bundle, threads, prompt_tokens + steps + 16, profile_prefix=str(out_dir / "decoder"))
    ids = prompt_ids(prompt_tokens, d.info["vocab_size"])
    t0 = time.perf_counter()
    logits = d.prefill(ids)
    prefill_wall = time.perf_counter() - t0
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = d.step(logits)
        walls.append(time.perf_counter() - t0)
    trace = Path(d.session.end_profiling())
    return _result(bundle, trace, threads, prompt_tokens, prefill_wall, walls)


def profile_ortgenai(model_dir: Path, *, threads: int = 2, steps: int = 20, prompt_tokens: int = 512,
                     out_dir: Path | None = None) -> dict:
    """The same breakdown for an onnxruntime-genai model, profiled inside its own Generator."""
    import onnxruntime_genai as og

    from .common import prompt_ids

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="minicpmo-profile-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1,
        "enable_profiling": str(out_dir / "ortgenai")}}}}))
    model = og.Model(config)
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    total = prompt_tokens + steps + 1
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt_ids(prompt_tokens, vocab))
    gen.generate_next_token()  # picks from the prompt's logits: no model run
    prefill_wall = time.perf_counter() - t0
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        gen.generate_next_token()
        walls.append(time.perf_counter() - t0)
    del gen, params, model  # the session writes its trace when it is destroyed
    traces = sorted(out_dir.glob("ortgenai*.json"), key=lambda f: f.stat().st_mtime)
    if not traces:
        raise RuntimeError(f"onnxruntime-genai wrote no profile into {out_dir}")
    return _result(model_dir, traces[-1], threads, prompt_tokens, prefill_wall, walls)


def _result(model: Path, trace: Path, threads: int, prompt_tokens: int, prefill_wall: float,
            walls: list[float]) -> dict:
    """The breakdown of a trace whose last len(walls) runs are decode steps and the rest the prompt."""
    steps = len(walls)
    runs = split_runs(json.loads(trace.read_text()))
    if len(runs) <= steps:
        raise RuntimeError(f"expected more than {steps} runs in {trace}, found {len(runs)}")
    prompt = runs[:-steps]  # a long prompt runs in chunks (runtime/generate.py PREFILL_CHUNK)
    merged = {"run_us": sum(r["run_us"] for r in prompt), "nodes": [n for r in prompt for n in r["nodes"]]}
    return {"bundle": str(model), "threads": threads, "steps": steps, "prompt_tokens": prompt_tokens,
            "trace": str(trace), "prefill": breakdown([merged], [prefill_wall]),
            "decode": breakdown(runs[-steps:], walls)}


def split_runs(events: list[dict]) -> list[dict]:
    """[{"run_us", "nodes": [(op, name, us)]}] per session run, in order (nodes matched by time)."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    out = [{"run_us": r["dur"], "start": r["ts"], "end": r["ts"] + r["dur"], "nodes": []} for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for r in out:
            if r["start"] <= e["ts"] <= r["end"]:
                r["nodes"].append((e["args"].get("op_name", "?"), e["name"], e["dur"]))
                break
    return out


def breakdown(runs: list[dict], walls: list[float]) -> dict:
    """Median milliseconds per run: each group, ORT overhead, Python overhead, and the wall time."""
    per_group: dict[str, list[float]] = defaultdict(list)
    kernels, ort_overhead, python = [], [], []
    for r, wall in zip(runs, walls, strict=True):
        sums: dict[str, float] = defaultdict(float)
        for op, name, us in r["nodes"]:
            group = next(g for g, match in GROUPS if match(op, name))
            sums[group] += us / 1000
        for g, _ in GROUPS:
            per_group[g].append(sums[g])
        k = sum(sums.values())
        kernels.append(k)
        ort_overhead.append(r["run_us"] / 1000 - k)
        python.append(wall * 1000 - r["run_us"] / 1000)
    med = {g: round(statistics.median(v), 3) for g, v in per_group.items()}
    wall_ms = statistics.median(walls) * 1000
    return {"wall_ms": round(wall_ms, 3), "groups_ms": med, "kernels_ms": round(statistics.median(kernels), 3),
            "ort_overhead_ms": round(statistics.median(ort_overhead), 3),
            "python_overhead_ms": round(statistics.median(python), 3),
            "ops_ms": _ops(runs)}


def _ops(runs: list[dict]) -> dict:
    """Mean milliseconds per run by operator type (all of them, largest first)."""
    tot: dict[str, float] = defaultdict(float)
    for r in runs:
        for op, _, us in r["nodes"]:
            tot[op] += us / 1000 / len(runs)
    return {op: round(ms, 3) for op, ms in sorted(tot.items(), key=lambda kv: -kv[1])}


def markdown(result: dict) -> str:
    lines = [f"{result['steps']} decode steps after a {result['prompt_tokens']}-token prompt, "
             f"{result['threads']} threads; medians per step (the prompt: one run).", "",
             "| part | decode ms/step | % of the step | prompt ms |", "|---|---|---|---|"]
    dec, pre = result["decode"], result["prefill"]
    parts = [*dec["groups_ms"], "ORT overhead (run - kernels)", "caller (wall - run)"]
    for p in parts:
        key = {"ORT overhead (run - kernels)": "ort_overhead_ms", "caller (wall - run)": "python_overhead_ms"}.get(p)
        d = dec[key] if key else dec["groups_ms"][p]
        q = pre[key] if key else pre["groups_ms"][p]
        lines.append(f"| {p} | {d:.2f} | {100 * d / dec['wall_ms']:.1f}% | {q:.1f} |")
    lines.append(f"| **wall** | **{dec['wall_ms']:.2f}** | 100% | {pre['wall_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path, help="our bundle, or an onnxruntime-genai model folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--out-dir", type=Path, help="where the ORT trace goes [a temp folder]")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    run = profile_ortgenai if (a.bundle / "genai_config.json").is_file() else profile_decode
    res = run(a.bundle, threads=a.threads, steps=a.steps, prompt_tokens=a.prompt_tokens, out_dir=a.out_dir)
    print(json.dumps(res, indent=2) if a.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
