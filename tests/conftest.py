"""Shared fixtures: tiny synthetic checkpoints and bundles exported from them (once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_TOKENIZER = SHARED / "reference" / "tokenizer"


def real_tokenizer_dir() -> Path | None:
    return REAL_TOKENIZER if (REAL_TOKENIZER / "tokenizer.json").is_file() else None


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _free_tmp_path(request):
    """Delete a passing test's tmp_path as soon as it ends (a failing one's stays for a look).

    Many tests copy a ~160 MB bundle (the real 151k-token vocabulary) to damage it; pytest keeps every
    tmp_path until the session ends, which peaked at 3.8 GB of disk per run and filled a CI disk."""
    yield
    path = request.node.funcargs.get("tmp_path")
    if path is not None and not request.node.stash.get(_FAILED, False):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny synthetic checkpoint in the upstream format, with the real tokenizer when available."""
    pytest.importorskip("torch")
    from minicpmo.export.synth import write_synthetic_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    return write_synthetic_checkpoint(out, size="tiny", seed=0, audio=True, tokenizer_dir=real_tokenizer_dir())


def _export(tmp_path_factory, checkpoint: Path, name: str, **opts) -> Path:
    from minicpmo.export.bundle import export_bundle
    from minicpmo.export.options import ExportOptions

    out = tmp_path_factory.mktemp("bundles") / name
    return export_bundle(checkpoint, out, ExportOptions(**opts), progress=lambda *a: None)


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-fp32", precision="fp32")


@pytest.fixture(scope="session")
def int4_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-int4", precision="int4")


@pytest.fixture(scope="session")
def int8_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-int8", precision="int8")


@pytest.fixture(scope="session")
def int4_kv8_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """int4 weights with an int8 KV cache calibrated at export."""
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-int4-kv8", precision="int4", kv_cache="int8")


@pytest.fixture(scope="session")
def int4_fp16_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """The GPU variant: int4 weights, fp16 activations, scales and KV cache."""
    return _export(tmp_path_factory, tiny_checkpoint, "tiny-int4-fp16", precision="int4", decoder_dtype="fp16")
