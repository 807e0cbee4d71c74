"""Download an image URL for a request without letting it probe the server's own network (SSRF guard).

Every hop (the URL and each redirect target) is resolved, and every address the host resolves to is
checked; the connection then goes to a checked address (pinned), so a DNS answer that changes between
the check and the connect cannot slip a private address in. The whole download, redirects included,
has one deadline and one byte limit. Proxy environment variables are not used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass

from ..errors import ImageError
from ..preprocess.image_io import short

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private: bool = False


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str  # path + query, what goes on the request line


def fetch_url(url: str, policy: FetchPolicy) -> bytes:
    """The body of an http(s) URL, following at most `policy.max_redirects` redirects.

    Raises:
        ImageError: bad URL, refused address, unreachable host, HTTP error, too many redirects,
            too large, or past the deadline.
    """
    name = short(url)
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        target = _parse(url, name)
        addresses = resolve_checked(target.host, target.port, policy.allow_private, name)
        body, location = _get(target, addresses, deadline, policy.max_bytes, name)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise ImageError(f"{name}: more than {policy.max_redirects} redirects")


def is_private_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for loopback, private, link-local, shared, reserved, multicast... anything not public."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_private_address(embedded)
    return not ip.is_global or ip.is_multicast


def resolve_checked(host: str, port: int, allow_private: bool, name: str) -> list[str]:
    """All addresses of `host`; raises ImageError if any of them is private and that is not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise ImageError(f"{name}: cannot resolve host {host!r}: {e}") from e
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise ImageError(f"{name}: host {host!r} has no address")
    if not allow_private:
        for address in addresses:
            if is_private_address(ipaddress.ip_address(address.split("%")[0])):
                raise ImageError(f"{name}: host {host!r} is a loopback or private address ({address}); "
                                 "image URLs may not reach it (start the server with --allow-private-urls "
                                 "to allow this)")
    return addresses


def _parse(url: str, name: str) -> _Target:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ImageError(f"{name}: malformed URL: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageError(f"{name}: only http and https URLs can be fetched (redirect to {scheme!r}?)")
    if not parts.hostname:
        raise ImageError(f"{name}: URL has no host")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path)


def _get(target: _Target, addresses: list[str], deadline: float, max_bytes: int,
         name: str) -> tuple[bytes, str | None]:
    """(body, None) for a 200, (b"", location) for a redirect; raises ImageError otherwise."""
    conn = _connect(target, addresses, deadline, name)
    try:
        conn.request("GET", target.path, headers={"User-Agent": "minicpmo-onnx", "Accept": "image/*"})
        response = conn.getresponse()
        location = response.getheader("Location")
        if response.status in _REDIRECTS and location:
            return b"", location
        if response.status != 200:
            raise ImageError(f"{name}: image URL answered HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise ImageError(f"{name}: image is {length} bytes, more than the limit of {max_bytes}")
        return _read_capped(response, deadline, max_bytes, name), None
    except (OSError, http.client.HTTPException) as e:
        raise ImageError(f"{name}: cannot fetch image URL: {e or type(e).__name__}") from e
    finally:
        conn.close()


def _read_capped(response: http.client.HTTPResponse, deadline: float, max_bytes: int, name: str) -> bytes:
    """The body, read in chunks. Each read waits at most the socket timeout (the time left at connect);
    the deadline is checked between reads, so a trickling server is cut off too."""
    chunks, size = [], 0
    while True:
        _remaining(deadline, name)
        chunk = response.read(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise ImageError(f"{name}: image is more than the limit of {max_bytes} bytes")
        chunks.append(chunk)


def _connect(target: _Target, addresses: list[str], deadline: float, name: str) -> http.client.HTTPConnection:
    last: OSError | None = None
    for address in addresses:
        timeout = _remaining(deadline, name)
        if target.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPS(target.host, target.port, address, timeout)
        else:
            conn = _PinnedHTTP(target.host, target.port, address, timeout)
        try:
            conn.connect()
            return conn
        except OSError as e:  # includes ssl.SSLError and timeouts: try the next address
            conn.close()
            last = e
    raise ImageError(f"{name}: cannot connect to {target.host}:{target.port}: {last}")


def _remaining(deadline: float, name: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ImageError(f"{name}: image download timed out")
    return left


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to a pre-checked address; the Host header still names the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a pre-checked address; SNI and certificate checks use the host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)
