"""Loading untrusted images: every failure is an ImageError naming the source (runtime/preprocess/image_io.py)."""

from __future__ import annotations

import base64
import io
import random
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from minicpmo.runtime.errors import ImageError, InputError
from minicpmo.runtime.preprocess.image import load_image, open_image_bytes


def encoded(fmt: str = "PNG", size=(23, 17), mode: str = "RGB", **save) -> bytes:
    rgb = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with (almost) no pixel data: a few hundred bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- bytes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"),
                                       ("JPEG", "RGB"), ("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "RGB"),
                                       ("WEBP", "RGB"), ("TIFF", "RGB")])
def test_open_image_bytes_converts_to_rgb(fmt, mode):
    img = open_image_bytes(encoded(fmt, mode=mode))
    assert img.mode == "RGB" and img.size == (23, 17)


def test_rgba_alpha_is_dropped_like_upstream():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    assert open_image_bytes(buf.getvalue()).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "cannot identify image"),
    (encoded("PNG")[:60], "truncated, corrupt or unsupported"),
    (encoded("JPEG")[:200], "cannot read image header|truncated, corrupt or unsupported"),
    (png_header_only(50, 50), "truncated, corrupt or unsupported"),
])
def test_open_image_bytes_errors(data, message):
    with pytest.raises(ImageError, match=message) as info:
        open_image_bytes(data, source="photo.png")
    assert str(info.value).startswith("photo.png: ")
    assert isinstance(info.value, InputError) and info.value.code == "invalid_image"


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(ImageError, match="9000x9000 = 81000000 pixels, more than the limit of 64000000"):
        open_image_bytes(png_header_only(9000, 9000))
    with pytest.raises(ImageError, match="more than the limit of 100"):
        open_image_bytes(encoded("PNG"), max_pixels=100)


def test_pil_decompression_bomb_guard_still_applies_without_our_limit():
    with pytest.raises(ImageError, match="too large"):
        open_image_bytes(png_header_only(30000, 30000), max_pixels=None)


def test_damaged_files_only_ever_raise_image_error():
    rng = random.Random(1234)
    blobs = [encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")]
    for _ in range(300):
        data = bytearray(rng.choice(blobs))
        if rng.random() < 0.5:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            assert open_image_bytes(bytes(data), max_pixels=1_000_000).mode == "RGB"
        except ImageError:
            pass


# -- sources -----------------------------------------------------------------------------------------

def test_load_image_from_path_data_uri_and_base64(tmp_path):
    data = encoded("PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in (str(path), f"file://{path}", f"data:image/png;base64,{b64}", b64, b64[:40] + "\n" + b64[40:],
                base64.urlsafe_b64encode(data).decode().rstrip("=")):
        assert load_image(src).size == (23, 17)


@pytest.mark.parametrize("src, message", [
    ("", "empty"),
    ("/no/such/dir/photo.jpg", "is not an existing file"),
    ("photo.jpg", "is not an existing file"),
    ("abcd", "is not an existing file, and as base64 it is not an image"),
    ("data:image/png,rawbytes", "only base64 data URIs"),
    ("data:image/png;base64,@@@", "does not hold valid base64"),
    ("data:image/png;base64", "malformed data URI"),
    ("ftp://example.com/x.png", "unsupported URL scheme"),
])
def test_load_image_errors(src, message):
    with pytest.raises(ImageError, match=message):
        load_image(src)


def test_load_image_long_sources_are_shortened_in_messages():
    junk = base64.b64encode(b"x" * 3000).decode()
    with pytest.raises(ImageError) as info:
        load_image(f"data:image/png;base64,{junk}")
    assert len(str(info.value)) < 200 and "chars)" in str(info.value)


def test_load_image_directory_and_size_cap(tmp_path):
    with pytest.raises(ImageError, match="is not an existing file"):
        load_image(str(tmp_path))
    path = tmp_path / "big.png"
    path.write_bytes(encoded("PNG"))
    with pytest.raises(ImageError, match="more than the limit of 10"):
        load_image(str(path), max_bytes=10)
    with pytest.raises(ImageError, match="not allowed"):
        load_image(f"file://{path}", allow_files=False)


# -- URLs (a server on 127.0.0.1) --------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server API)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()  # no Content-Length: the byte cap must hold while reading
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    _Handler.routes = {"/x.png": encoded("PNG"), "/big": encoded("PNG", size=(300, 300)), "/text": b"hello"}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_load_image_from_url(server):
    assert load_image(f"{server}/x.png").size == (23, 17)


@pytest.mark.parametrize("path, kw, message", [
    ("/missing", {}, "HTTP 404"),
    ("/text", {}, "cannot identify image"),
    ("/big", {"max_bytes": 1000}, "more than the limit of 1000 bytes"),
    ("/x.png", {"allow_urls": False}, "not allowed"),
])
def test_load_image_url_errors(server, path, kw, message):
    with pytest.raises(ImageError, match=message) as info:
        load_image(f"{server}{path}", **kw)
    assert "127.0.0.1" in str(info.value)


def test_load_image_unreachable_and_slow_urls():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="cannot fetch image URL"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout_s=2)
    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with pytest.raises(ImageError, match="cannot fetch image URL"):
            load_image(f"http://127.0.0.1:{listener.getsockname()[1]}/x.png", timeout_s=0.3)
