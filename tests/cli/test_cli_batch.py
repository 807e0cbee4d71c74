"""Several prompts from `minicpmo infer`, and `minicpmo serve --parallel` stating its KV memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from test_cli import minicpmo


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
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.stderr.close()
