"""The `minicpmo` command line, end to end on tiny bundles, as a user runs it (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_IMAGE = REPO / "cli" / "assets" / "demo.png"


def minicpmo(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "minicpmo.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"minicpmo {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("command", ["synth", "export", "infer", "chat", "serve", "bench"])
def test_help(command):
    out = minicpmo(command, "--help").stdout
    assert "Usage:" in out


def test_infer_json_is_deterministic_and_greedy(fp32_bundle):
    args = ["infer", "--model", fp32_bundle, "--image", DEMO_IMAGE, "--prompt", "What is this?",
            "--max-tokens", "12", "--json"]
    first = json.loads(minicpmo(*args).stdout)
    again = json.loads(minicpmo(*args).stdout)
    assert first == {**again, "usage": first["usage"]}
    assert set(first) == {"text", "finish_reason", "token_ids", "prompt_token_ids", "usage"}
    assert 1 <= len(first["token_ids"]) <= 12
    assert first["finish_reason"] == ("length" if len(first["token_ids"]) == 12 else "stop")
    assert first["usage"]["prompt_tokens"] == len(first["prompt_token_ids"])
    assert first["usage"]["completion_tokens"] == len(first["token_ids"])
    assert first["usage"]["decode_tokens_per_s"] > 0
    with_lookup = json.loads(minicpmo(*args, "--lookup", "4").stdout)
    assert with_lookup["token_ids"] == first["token_ids"]


def test_infer_streams_text_to_stdout_and_stats_to_stderr(int4_bundle):
    proc = minicpmo("infer", "--model", int4_bundle, "--image", DEMO_IMAGE, "--prompt", "Describe it.",
                    "--max-tokens", "8", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "50", "--seed", "3",
                    "--lookup", "3")
    assert proc.stdout.strip()
    assert "prompt tokens" in proc.stderr and "Traceback" not in proc.stderr
    assert re.search(r"lookup kept \d+ of \d+ draft tokens", proc.stderr)


def test_sampling_with_a_seed_repeats(int4_bundle):
    args = ["infer", "--model", int4_bundle, "--prompt", "Hi", "--max-tokens", "10", "--temperature", "1.0",
            "--seed", "7", "--json"]
    assert json.loads(minicpmo(*args).stdout)["token_ids"] == json.loads(minicpmo(*args).stdout)["token_ids"]


def test_chat_commands(fp32_bundle, tmp_path):
    import soundfile as sf

    from synthetic_media import make_image, tone

    sf.write(tmp_path / "clip.wav", tone(1.2), 16000)
    (tmp_path / "frames").mkdir()
    for k in range(2):
        make_image(160, 120, seed=k).save(tmp_path / "frames" / f"{k}.png")
    script = "\n".join([
        "Hello there",
        f"\\image {DEMO_IMAGE} What is in the picture?",
        f"\\audio {tmp_path / 'clip.wav'} What do you hear?",
        f"\\video {tmp_path / 'frames'} What happens?",
        "And the colours?",
        "\\bogus",
        "\\image /no/such/file.png",
        "\\system You are terse.",
        "Again",
        "\\clear",
        "\\exit",
    ]) + "\n"
    proc = minicpmo("chat", "--model", fp32_bundle, "--max-tokens", "6", input=script)
    assert "Traceback" not in proc.stderr
    assert "unknown command \\bogus; \\help lists the commands" in proc.stderr
    assert "error:" in proc.stderr  # the missing image is reported, the chat goes on
    assert "conversation cleared" in proc.stderr
    assert proc.stderr.count("error:") == 1  # only the missing image: audio and video turns worked


@pytest.mark.parametrize("args, message", [
    (["infer", "--model", "/no/such/bundle", "--prompt", "x"], "not a bundle folder"),
    (["export", "/no/such/checkpoint"], "no/such/checkpoint"),
    (["infer", "--model", "/no/such/bundle", "--prompt", "x", "--image", "/no/such.png"], "/no/such.png"),
    (["infer", "--model", "/no/such/bundle", "--prompt", "x", "--audio", "/no/such.wav"], "'/no/such.wav' does not exist"),
    (["infer", "--model", "/no/such/bundle", "--prompt", "x", "--video", "/no/such.mp4"], "'/no/such.mp4' does not exist"),
    (["infer", "--model", "/no/such/bundle", "--prompt", "x", "--frames", "/no/such/dir"], "'/no/such/dir' does not exist"),
    (["infer", "--model", "/no/such/bundle"], "give the question with --prompt TEXT"),
    (["infer", "--model", "/no/such/bundle", "--prompt", "x", "--temperature", "hot"], "'hot' is not a valid float"),
    (["serve", "--model", "/no/such/bundle", "--max-image-bytes", "12Q"], "'12Q' is not a size"),
    (["serve", "--model", "/no/such/bundle"], "not a bundle folder"),
    (["chat", "--model", "/no/such/bundle"], "not a bundle folder"),
    (["nosuchcommand"], "No such command"),
])
def test_bad_input_is_one_error_line_and_exit_1(args, message):
    proc = minicpmo(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and proc.stdout == ""


def test_version_and_help():
    from minicpmo import __version__

    assert minicpmo("--version").stdout.strip() == f"minicpmo, version {__version__}"
    for command in ("infer", "chat", "serve"):
        out = minicpmo(command, "--help").stdout
        assert f"minicpmo {command} --model" in out  # an example
        options = re.findall(r"^  (-[-\w]+)", out, re.MULTILINE)
        assert options[0] == "--model"  # model first, runtime options last
        assert options.index("--provider") > options.index("--max-tokens" if command != "serve" else "--host")
    assert "[20 MiB]" in minicpmo("serve", "--help").stdout


def test_every_option_has_help_text():
    import click

    from minicpmo.cli.main import cli

    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"minicpmo {name} {param.opts[0]} has no help"


def test_sizes_are_read_and_shown_human_readable():
    import click

    from minicpmo.cli.options import ByteSize, human_bytes

    size = ByteSize()
    assert [size.convert(v, None, None) for v in ("20MiB", "20M", "1.5GiB", "4096", "500k", "2 KiB")] == \
        [20 * 2**20, 20_000_000, 3 * 2**29, 4096, 500_000, 2048]
    with pytest.raises(click.BadParameter):
        size.convert("lots", None, None)
    assert (human_bytes(20 * 2**20), human_bytes(1536), human_bytes(10)) == ("20 MiB", "1.5 KiB", "10 B")


def test_max_tokens_past_the_context_and_cut_replies_are_reported(fp32_bundle):
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "Hi", "--max-tokens", "500", "--context", "64")
    assert "note: --max-tokens 500 is more than the context leaves for the reply" in proc.stderr
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "Hi", "--max-tokens", "1", "--json")
    assert json.loads(proc.stdout)["finish_reason"] in ("length", "stop")
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "Hi", "--max-tokens", "2")
    if "stopped at --max-tokens 2" not in proc.stderr:  # the model may end its reply within 2 tokens
        assert re.search(r"\d+ prompt tokens, [12] generated", proc.stderr), proc.stderr


def test_max_slices_limits_the_image_tokens(fp32_bundle, tmp_path):
    from synthetic_media import make_image

    big = tmp_path / "wide.png"
    make_image(1344, 896, seed=1).save(big)
    counts = {}
    for n in (None, 1, 2):
        extra = ["--max-slices", str(n)] if n else []
        out = json.loads(minicpmo("infer", "--model", fp32_bundle, "--image", big, "--prompt", "x", "--max-tokens",
                                  "1", "--json", *extra).stdout)
        counts[n] = out["usage"]["prompt_tokens"]
    query = 64  # the tiny bundle's rows per slice
    assert counts[1] < counts[2] < counts[None]
    assert counts[None] - counts[1] >= 5 * query  # 1344x896 cuts into 6 slices plus the overview


def test_broken_image_is_a_clean_error(fp32_bundle, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(DEMO_IMAGE.read_bytes()[:200])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    for path in (bad, empty, text):
        proc = minicpmo("infer", "--model", fp32_bundle, "--image", path, "--prompt", "x", check=False)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_prompt_past_the_context_is_a_clean_error(fp32_bundle):
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "word " * 300, "--context", "64", check=False)
    assert proc.returncode == 1
    assert "context" in proc.stderr and "Traceback" not in proc.stderr


def test_synth_export_infer_with_the_builtin_tokenizer(tmp_path):
    """The demo path: no ../shared, the project's own small tokenizer, int4 export, infer."""
    ckpt, bundle = tmp_path / "ckpt", tmp_path / "bundle"
    minicpmo("synth", ckpt, "--size", "tiny", "--no-audio")
    proc = minicpmo("export", ckpt, "-o", bundle)
    # the default head's two errors are printed: int4 ~9%, int8 ~0.5%
    assert re.search(r"lm_head int4\+int8: int4 scan 0\.(0[5-9]|1[0-4])\d\d, the 64 best rescored at int8 0\.00\d\d",
                     proc.stderr), proc.stderr
    proc = minicpmo("export", ckpt, "-o", bundle, check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    out = json.loads(minicpmo("infer", "--model", bundle, "--image", DEMO_IMAGE, "--prompt", "What?",
                              "--max-tokens", "5", "--json").stdout)
    assert out["usage"]["completion_tokens"] >= 1
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "audio" not in manifest and manifest["options"]["precision"] == "int4"
    # The GPU variant exports and runs on the CPU too (ONNX Runtime has CPU kernels for its fp16 ops).
    minicpmo("export", ckpt, "-o", tmp_path / "fp16", "--decoder-dtype", "fp16")
    assert json.loads((tmp_path / "fp16" / "manifest.json").read_text())["decoder"]["kv_dtype"] == "float16"
    out = json.loads(minicpmo("infer", "--model", tmp_path / "fp16", "--prompt", "Hi", "--max-tokens", "3",
                              "--json").stdout)
    assert out["usage"]["completion_tokens"] >= 1
    # The int8 KV cache: calibrated during the export, then a normal bundle.
    minicpmo("export", ckpt, "-o", tmp_path / "kv8", "--kv-cache", "int8")
    assert json.loads((tmp_path / "kv8" / "manifest.json").read_text())["decoder"]["kv_dtype"] == "int8"
    out = json.loads(minicpmo("infer", "--model", tmp_path / "kv8", "--image", DEMO_IMAGE, "--prompt", "Hi",
                              "--max-tokens", "3", "--json").stdout)
    assert out["usage"]["completion_tokens"] >= 1
    proc = minicpmo("export", ckpt, "-o", tmp_path / "bad", "--kv-cache", "int8", "--decoder-dtype", "fp16",
                    check=False)
    assert proc.returncode == 1 and "fp32 decoder" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_during_export_leaves_no_partial_folder(tiny_checkpoint, tmp_path):
    """kill (SIGTERM) mid-export: the staged folder is deleted and nothing else is written."""
    proc = subprocess.Popen([sys.executable, "-m", "minicpmo.cli.main", "export", str(tiny_checkpoint),
                             "-o", str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".b.partial-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it was stopped"
            time.sleep(0.005)
        time.sleep(0.05)  # inside the export: a tiny one (no ../shared tokenizer) takes ~0.3 s in all
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_serve_checks_the_port_before_loading_and_warns_without_a_key(fp32_bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = minicpmo("serve", "--model", fp32_bundle, "--host", "0.0.0.0", "--port", port, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "warning: serving on 0.0.0.0 without an API key" in proc.stderr
    assert f"error: port {port} on 0.0.0.0 is already in use" in proc.stderr
    assert "loaded" not in proc.stderr and "Traceback" not in proc.stderr


def test_serve_runs_a_bundle_end_to_end(fp32_bundle):
    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minicpmo.cli.main", "serve", "--model", str(fp32_bundle),
                             "--port", "0", "--served-model-name", "tiny", "--max-tokens", "4"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server ended before it listened"
        url = re.search(r"on (http://\S+) ", line).group(1)
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "Hi"}], "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and 1 <= body["usage"]["completion_tokens"] <= 4
        # the reply fed back as history, whatever token text it holds, is accepted
        reply = body["choices"][0]["message"]["content"]
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply + " </image><ref>x</ref>"},
            {"role": "user", "content": "More"}]}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        stop_server(proc)


RECEIPT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["shop", "total", "items"],
                  "properties": {"shop": {"type": "string", "maxLength": 10}, "total": {"type": "number"},
                                 "items": {"type": "array", "maxItems": 2,
                                           "items": {"enum": ["bread", "milk", "tea"]}}}}


@pytest.mark.parametrize("temperature", ["0", "1"])
def test_infer_json_schema_reply_validates(fp32_bundle, tmp_path, temperature):
    jsonschema = pytest.importorskip("jsonschema")
    schema = tmp_path / "receipt.json"
    schema.write_text(json.dumps(RECEIPT_SCHEMA))
    out = json.loads(minicpmo("infer", "--model", fp32_bundle, "--prompt", "Read the receipt.", "--json-schema",
                              schema, "--max-tokens", "300", "--temperature", temperature, "--seed", "2",
                              "--json").stdout)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), RECEIPT_SCHEMA)


@pytest.mark.parametrize("content, message", [
    ('{"type": "array", "uniqueItems": true}', "uniqueItems"),
    ("{not json", "not a readable JSON file"),
])
def test_infer_bad_json_schema_is_one_error_line(fp32_bundle, tmp_path, content, message):
    schema = tmp_path / "schema.json"
    schema.write_text(content)
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "x", "--json-schema", schema, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr


def stop_server(server: subprocess.Popen) -> None:
    """Ctrl-C the server, as a user would; kill it if it has not exited within 30 s."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=30)
    finally:
        server.kill()
        server.stderr.close()
