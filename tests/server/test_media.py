"""Image references under the server's policy: SSRF guard, redirects, limits, the local media folder."""

from __future__ import annotations

import ipaddress
import urllib.parse
from pathlib import Path

import pytest

from minicpmo.runtime.errors import ImageError
from minicpmo.runtime.server import fetch
from minicpmo.runtime.server.fetch import FetchPolicy, fetch_url, is_private_address, resolve_checked
from minicpmo.runtime.server.media import MediaPolicy, load_image_url
from server_helpers import b64, data_uri, make_image


def policy(*, allow_private=True, folder: Path | None = None, max_redirects=3, timeout=5.0, max_bytes=1 << 20,
           allow_urls=True) -> MediaPolicy:
    return MediaPolicy(max_image_bytes=max_bytes, max_image_pixels=1 << 20, max_images=8,
                       allowed_local_media=folder.resolve() if folder else None, allow_urls=allow_urls,
                       fetch=FetchPolicy(timeout, max_bytes, max_redirects, allow_private))


@pytest.mark.parametrize("address, private", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("10.1.2.3", True), ("172.16.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("0.0.0.0", True), ("224.0.0.1", True),
    ("255.255.255.255", True), ("::1", True), ("fe80::1", True), ("fc00::1", True), ("::", True),
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", True), ("2002:7f00:1::", True), ("64:ff9b::a00:1", True),
    ("8.8.8.8", False), ("1.1.1.1", False), ("2606:4700:4700::1111", False), ("::ffff:8.8.8.8", False),
])
def test_private_addresses(address, private):
    assert is_private_address(ipaddress.ip_address(address)) is private


def test_loopback_names_are_refused_unless_allowed():
    for host in ("127.0.0.1", "localhost", "::1"):
        with pytest.raises(ImageError, match="--allow-private-urls"):
            resolve_checked(host, 80, allow_private=False, name="x")
    assert resolve_checked("127.0.0.1", 80, allow_private=True, name="x") == ["127.0.0.1"]


def test_fetch_image_and_redirects_within_the_limit(img_url):
    img = load_image_url(f"{img_url}/img/4.png", policy())
    assert img.tobytes() == make_image(4).tobytes()
    img = load_image_url(f"{img_url}/redirect/3/5.png", policy(max_redirects=3))
    assert img.tobytes() == make_image(5).tobytes()


def test_redirect_chain_over_the_limit_is_refused(img_url):
    with pytest.raises(ImageError, match="more than 2 redirects"):
        fetch_url(f"{img_url}/redirect/3/5.png", FetchPolicy(5.0, 1 << 20, 2, True))


def test_each_redirect_target_is_checked_again(img_url, monkeypatch):
    # 127.0.0.1 plays a public host here; the redirect then points at a "private" 127.0.0.2.
    monkeypatch.setattr(fetch, "is_private_address", lambda ip: str(ip) != "127.0.0.1")
    port = img_url.rsplit(":", 1)[1]
    no_private = FetchPolicy(5.0, 1 << 20, 3, False)
    assert fetch_url(f"{img_url}/img/1.png", no_private)  # the first hop is allowed
    away = f"{img_url}/away?to=" + urllib.parse.quote(f"http://127.0.0.2:{port}/img", safe="")
    with pytest.raises(ImageError, match="cannot connect to 127.0.0.2"):  # nothing listens there, but
        fetch_url(f"{away}/1.png", FetchPolicy(5.0, 1 << 20, 3, True))  # the redirect was followed...
    with pytest.raises(ImageError, match=r"private address \(127.0.0.2\)"):
        fetch_url(f"{away}/1.png", no_private)  # ...and is refused when its target is private


def test_fetch_failures_are_image_errors(img_url):
    with pytest.raises(ImageError, match="HTTP 404"):
        fetch_url(f"{img_url}/missing", FetchPolicy(5.0, 1 << 20, 3, True))
    with pytest.raises(ImageError, match="limit"):
        fetch_url(f"{img_url}/img/1.png", FetchPolicy(5.0, 20, 3, True))
    with pytest.raises(ImageError, match="timed out"):
        fetch_url(f"{img_url}/slow", FetchPolicy(0.3, 1 << 20, 3, True))
    with pytest.raises(ImageError, match="cannot identify image"):
        load_image_url(f"{img_url}/text", policy())
    with pytest.raises(ImageError, match="disabled"):
        load_image_url(f"{img_url}/img/1.png", policy(allow_urls=False))


def test_data_uri_and_raw_base64():
    img = make_image(6)
    assert load_image_url(data_uri(img), policy()).tobytes() == img.tobytes()
    assert load_image_url(b64(img), policy()).tobytes() == img.tobytes()


def test_local_paths_inside_the_folder(media_dir):
    expected = make_image(1).tobytes()
    p = policy(folder=media_dir)
    for ref in ("in.png", str(media_dir / "in.png"), f"file://{media_dir / 'in.png'}", "./sub/../in.png"):
        assert load_image_url(ref, p).tobytes() == expected, ref


@pytest.mark.parametrize("ref, message", [
    ("../outside/secret.png", "allowed media folder"),
    ("escape.png", "allowed media folder"),  # a symlink that leaves the folder
    ("file://{media}/escape.png", "outside the allowed media folder"),
    ("file://{media}/../outside/secret.png", "outside the allowed media folder"),
    ("{media}/../outside/secret.png", "allowed media folder"),
    ("file://otherhost{media}/in.png", "no host"),
    ("missing.png", "allowed media folder"),
])
def test_local_paths_outside_the_folder_are_refused(media_dir, ref, message):
    with pytest.raises(ImageError, match=message):
        load_image_url(ref.format(media=media_dir), policy(folder=media_dir))


def test_local_paths_refused_without_a_folder(media_dir):
    for ref in (str(media_dir / "in.png"), f"file://{media_dir / 'in.png'}"):
        with pytest.raises(ImageError, match="--allowed-local-media"):
            load_image_url(ref, policy())
