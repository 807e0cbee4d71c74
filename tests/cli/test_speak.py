"""`--speak` / `--voice` on the command line: what fails, fails as one error line."""

from __future__ import annotations

import pytest
from test_cli import minicpmo


@pytest.mark.parametrize("extra, message", [
    (["--voice", "me.wav"], "--voice needs --speak"),
    (["--speak", "out.wav", "--voice", "missing.wav"], "no such audio file"),
])
def test_speak_usage_errors(fp32_bundle, extra, message):
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "hi", *extra, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_speak_on_a_bundle_without_speech_is_an_error(fp32_bundle, tmp_path):
    out = tmp_path / "out.wav"
    proc = minicpmo("infer", "--model", fp32_bundle, "--prompt", "hi", "--max-tokens", "3", "--speak", out,
                    check=False)
    assert proc.returncode == 1 and "cannot speak" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    proc = minicpmo("chat", "--model", fp32_bundle, "--speak", "--speak-dir", tmp_path, check=False, input="hi\n")
    assert proc.returncode == 1 and "cannot speak" in proc.stderr
