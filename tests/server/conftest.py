"""Fixtures of the server tests: apps on a FakePipeline, in-process (TestClient) or on real uvicorn."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # server_helpers, whatever pytest's import mode

from fastapi.testclient import TestClient  # noqa: E402

from server_helpers import FakePipeline, image_server, make_image, png_bytes, started_client  # noqa: E402


@pytest.fixture
def fake() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def client(fake) -> Iterator[TestClient]:
    with started_client(fake, allow_private_urls=True) as c:
        yield c


@pytest.fixture(scope="module")
def img_url() -> Iterator[str]:
    with image_server() as url:
        yield url


@pytest.fixture
def media_dir(tmp_path) -> Path:
    """An allowed media folder with in.png, a sibling outside/secret.png and an escaping symlink."""
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "in.png").write_bytes(png_bytes(make_image(1)))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(png_bytes(make_image(2)))
    (folder / "escape.png").symlink_to(tmp_path / "outside" / "secret.png")
    return folder
