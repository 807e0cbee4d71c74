"""onnxruntime-genai: its model builder on the HF Qwen2 copy, then its Generator.

The builder runs as its own process, through `benchmarks.ortgenai_build`: the unmodified builder
except that its int4 pass quantizes one MatMul at a time (byte-identical output, checked by
`python -m benchmarks.ortgenai_build --check`), so the 7B shape builds in 24 GB. A failure is
reported, not raised. Timing: append_tokens(prompt) + the first generate_next_token (which only
picks from the prompt's logits) is the prefill; each further generate_next_token runs one step.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from .common import Protocol, kv_bytes_per_position, peak_rss_bytes, prompt_ids, run_repeats

log = logging.getLogger("benchmarks.ortgenai")


def build(hf_dir: Path, out: Path, *, block_size: int = 32, accuracy_level: int = 4,
          extra: tuple[str, ...] = (), timeout_s: float | None = None) -> dict:
    """Run the model builder (int4, CPU). Returns {"ok", "seconds", "peak_rss_bytes", "error"}."""
    cmd = [sys.executable, "-m", "benchmarks.ortgenai_build", "-i", str(hf_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(out.parent / f"{out.name}-cache"),
           "--extra_options", f"accuracy_level={accuracy_level}", f"block_size={block_size}", *extra]
    log.info("running %s", " ".join(cmd))
    from .procs import run_child

    res = run_child(cmd, timeout_s=timeout_s, quiet=True)
    res["command"] = " ".join(cmd)
    if res["returncode"] != 0:
        res["error"] = _builder_error(res)
    res["ok"] = res["returncode"] == 0 and (out / "model.onnx").is_file()
    return res


def _builder_error(res: dict) -> str:
    if res["returncode"] in (-9, 137):
        return f"killed (SIGKILL: out of memory?) at peak RSS {res['peak_rss_bytes'] / 1e9:.1f} GB"
    tail = [ln for ln in res.get("output_tail", "").splitlines() if ln.strip()]
    return f"exit code {res['returncode']}: {tail[-1] if tail else 'no output'}"


def open_model(model_dir: Path, threads: int):
    """(the model with `threads` intra-op threads, its genai_config's "model" section)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config), json.loads((model_dir / "genai_config.json").read_text())["model"]


def greedy_generator(model, total: int):
    """A Generator that decodes greedily to exactly `total` tokens (min_length = max_length masks EOS)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
    return og.Generator(model, params)


def measure(model_dir: Path, proto: Protocol) -> dict:
    model, dec = open_model(model_dir, proto.threads)
    ids = prompt_ids(proto.prompt_tokens, dec["vocab_size"])
    total = proto.prompt_tokens + proto.decode_tokens

    def setup():
        return greedy_generator(model, total)

    def prefill(gen):
        gen.append_tokens(ids)
        gen.generate_next_token()
        return gen

    def decode(gen):
        for _ in range(proto.decode_tokens - 1):
            gen.generate_next_token()
        if gen.token_count() != total:
            raise RuntimeError(f"generator stopped at {gen.token_count()} tokens, expected {total}")

    result = run_repeats(proto, prefill, decode, f"onnxruntime-genai {model_dir.name}", setup=setup)
    d = dec["decoder"]
    result["kv_bytes_per_position"] = kv_bytes_per_position(d["num_hidden_layers"], d["num_key_value_heads"],
                                                            d["head_size"], 4)  # fp32 KV on CPU
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
