"""Several prompts from `minicpmo infer`, and `minicpmo serve --parallel` stating its KV memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from test_cli import minicpmo, stop_server


def test_infer_answers_several_prompts_together_as_each_alone(fp32_bundle, tmp_path):
    common = ["infer", "--model", fp32_bundle, "--max-tokens", "8", "--temperature", "0", "--json"]
    prompts = ["What is this?", "Name a colour.", "Say something long about the sea and its tides."]
    alone = [json.loads(minicpmo(*common, "--prompt", p).stdout) for p in prompts]
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(prompts[1:]) + "\n\n", encoding="utf-8")
    lines = minicpmo(*common, "--prompt", prompts[0], "--prompts", questions).stdout.splitlines()
    together = sorted((json.loads(line) for line in lines), key=lambda r: r["index"])
    assert [r["prompt"] for r in together] == prompts
    for one, both in zip(alone, together, strict=True):
        assert (both["text"], both["token_ids"], both["finish_reason"]) == (
            one["text"], one["token_ids"], one["finish_reason"])


def test_infer_without_a_prompt_is_a_usage_error(fp32_bundle):
    proc = minicpmo("infer", "--model", fp32_bundle, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: give the question with --prompt")
    assert "Traceback" not in proc.stderr


def test_serve_parallel_logs_the_kv_memory_of_its_slots(fp32_bundle):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minicpmo.cli.main", "serve", "--model", str(fp32_bundle),
                             "--port", "0", "--parallel", "2", "--context", "256"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any("loaded" in line for line in lines):
            lines.append(proc.stderr.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        kv = next(line for line in lines if "KV cache:" in line)
        assert "2 slots x 256 positions" in kv and "MiB" in kv
    finally:
        stop_server(proc)


def _batch_one_copy(bundle, out):
    """The bundle with its decoder's batch dimension fixed to 1, as bundles exported before it were."""
    import shutil

    import onnx

    from minicpmo.runtime.manifest import sha256_file, write_manifest

    shutil.copytree(bundle, out)
    model = onnx.load(out / "decoder.onnx", load_external_data=False)
    for v in (*model.graph.input, *model.graph.output):
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param == "batch_size":
                d.Clear()
                d.dim_value = 1
    onnx.save(model, out / "decoder.onnx")
    data = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    data.pop("digests", None)
    f = out / "decoder.onnx"
    data["files"]["decoder.onnx"].update(bytes=f.stat().st_size, sha256=sha256_file(f))
    for v in data["decoder"]["inputs"] + data["decoder"]["outputs"]:
        v["shape"] = [1 if s == "batch_size" else s for s in v["shape"]]
    write_manifest(out, data)
    return out


def test_a_bundle_without_a_batch_dimension_serves_one_at_a_time_or_says_why(fp32_bundle, tmp_path):
    import pytest

    from minicpmo.runtime.errors import BundleError
    from minicpmo.runtime.pipeline import Pipeline

    old = _batch_one_copy(fp32_bundle, tmp_path / "old")
    proc = minicpmo("serve", "--model", old, "--port", "0", "--parallel", "2", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --parallel 2:") and "re-export" in proc.stderr
    with pytest.raises(BundleError, match="one sequence at a time"):
        Pipeline.load(old, parallel=2)
    assert Pipeline.load(old).batch is None  # one at a time still works
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "minicpmo.cli.main", "serve", "--model", str(old), "--port", "0"],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:  # without --parallel: the default falls back to one at a time, with a warning
        lines = []
        while not any("serving" in line and "http" in line for line in lines):
            lines.append(server.stderr.readline())
            assert lines[-1] or server.poll() is None, "".join(lines)
        assert any("serving one request at a time" in line and "re-export" in line for line in lines)
    finally:
        stop_server(server)
