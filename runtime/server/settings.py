"""ServerSettings: every knob of `minicpmo serve`, validated once at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..sampler import MAX_LOOKUP


@dataclass(frozen=True)
class ServerSettings:
    """Settings of the OpenAI-compatible server.

    The first group mirrors the `minicpmo serve` flags; the second has defaults that rarely need changing.
    """

    model_dir: Path | None = None  # informational (logs); the pipeline factory does the loading
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer KEY"
    allowed_local_media: Path | None = None  # local paths / file:// URLs only inside this folder
    allow_private_urls: bool = False  # let image URLs reach loopback / private / link-local hosts
    max_queue: int = 16  # requests waiting for the model (the running one not counted)
    max_image_bytes: int = 20 * 1024 * 1024  # encoded size of one image, whatever its source
    max_image_pixels: int = 40_000_000  # width*height, checked from the header before decoding
    request_timeout: float = 600.0  # seconds from arrival (queue wait + generation)
    served_model_names: tuple[str, ...] = ()  # ids clients may ask for; the first is reported [bundle name]
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any)
    default_max_tokens: int | None = None  # None: until a stop token or the end of the context
    parallel: int = 1  # generations decoded together (the pipeline must be loaded with as many slots)

    allow_urls: bool = True  # False: refuse every http(s) image URL (offline servers, fuzz tests)
    url_timeout: float = 10.0  # seconds for one image download, all redirects included
    max_redirects: int = 3
    max_images_per_request: int = 16
    max_request_bytes: int = 64 * 1024 * 1024  # whole JSON body (base64 images make it large)
    default_lookup: int = 0  # prompt lookup draft tokens for requests that do not set `lookup`

    def __post_init__(self) -> None:
        positive = ("parallel", "max_queue", "max_image_bytes", "max_image_pixels", "request_timeout", "url_timeout",
                    "max_images_per_request", "max_request_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be 0 or more, got {self.max_redirects!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be at least 1, got {self.default_max_tokens!r}")
        if not 0 <= self.default_lookup <= MAX_LOOKUP:
            raise ValueError(f"default_lookup must be in 0..{MAX_LOOKUP}, got {self.default_lookup!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        names = tuple(self.served_model_names)
        if any(not isinstance(n, str) or not n.strip() for n in names):
            raise ValueError(f"served model names must be non-empty, got {list(names)!r}")
        object.__setattr__(self, "served_model_names", names)
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.allowed_local_media is not None:
            folder = Path(self.allowed_local_media).expanduser().resolve()
            if not folder.is_dir():
                raise ValueError(f"--allowed-local-media {self.allowed_local_media}: not a folder")
            object.__setattr__(self, "allowed_local_media", folder)
