"""`minicpmo bench` end to end on a tiny bundle: every figure it reports is there and sane
(the speeds themselves are machine-dependent and asserted nowhere)."""

from __future__ import annotations

import json

from minicpmo.runtime.bench import TTFT_PROMPT_ROOM, run_bench

KEYS = {"date", "machine", "processor", "isa", "python", "onnxruntime", "numpy", "threads", "load_seconds", "provider",
        "cuda_graph", "vision_seconds_first_slice", "vision_seconds_per_448_slice", "vision_seconds_9_slice_image",
        "vision_slices_9_slice_image", "time_to_first_token_seconds", "prefill_tokens_per_s",
        "decode_tokens_per_s", "peak_rss_bytes", "bundle_bytes", "kv_cache_bytes"}


def test_bench_reports_every_figure(int4_kv8_bundle):
    lines = []
    result = run_bench(int4_kv8_bundle, threads=1, repeats=2, prompt_tokens=32, decode_tokens=4, provider="cpu",
                       log=lines.append)
    assert set(result) == KEYS
    assert result["provider"] == "cpu" and result["threads"] == 1
    assert result["vision_slices_9_slice_image"] == 10  # a 1344² image: a 3x3 grid plus the source
    for key in ("load_seconds", "vision_seconds_first_slice", "vision_seconds_per_448_slice",
                "vision_seconds_9_slice_image", "time_to_first_token_seconds", "prefill_tokens_per_s",
                "decode_tokens_per_s"):
        assert result[key] > 0, key
    # the bundle's files, and its int8 cache: room for the image prompt of the first-token measure (not
    # only for the 32-token prompt) + 4 + 16 positions, x layers x K and V x KV heads x head dim, 1 byte each
    manifest = json.loads((int4_kv8_bundle / "manifest.json").read_text())
    listed = sum(f["bytes"] for f in manifest["files"].values())
    assert result["bundle_bytes"] == listed + (int4_kv8_bundle / "manifest.json").stat().st_size
    caches = [i["shape"] for i in manifest["decoder"]["inputs"] if i["name"].startswith("past_key_values.")]
    assert result["kv_cache_bytes"] == (TTFT_PROMPT_ROOM + 4 + 16) * sum(s[1] * s[3] for s in caches)
    assert result["peak_rss_bytes"] > result["bundle_bytes"] / 2
    assert any("per 448x448 slice" in line and "first after loading" in line for line in lines)
    json.dumps(result)  # --json prints it as is
