"""The distribution builds without setuptools warnings and ships its data files and LICENSE."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "minicpmo", "export", "runtime", "cli")


def test_wheel_builds_cleanly_with_assets_and_license(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings (pip builds with >= 77)")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build's folders never land in the checkout
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    build = ("import sys, setuptools.build_meta as b; "
             "print(b.build_wheel(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # its own warning line
    proc = subprocess.run([sys.executable, "-W", "always", "-c", build, str(tmp_path / "dist")], cwd=src,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
    wheel = tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"minicpmo/__init__.py", "minicpmo/cli/assets/demo.png",
            "minicpmo/export/assets/upstream_config.json"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(zipfile.ZipFile(wheel).read(n) for n in names if n.endswith(".dist-info/METADATA"))
    assert b"License-Expression: Apache-2.0" in metadata
