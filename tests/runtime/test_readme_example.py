"""README's Python API example runs as written (on a tiny bundle instead of models/demo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_python_api_example_runs(fp32_bundle):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert 'Pipeline.load("models/demo")' in code
    code = code.replace('"models/demo"', repr(str(fp32_bundle)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\n(stop|length): \{'prompt_tokens': \d+", proc.stdout), proc.stdout
