"""`minicpmo serve`: check the bundle, then bind the port, then load the model in the background.

A bad bundle or a port in use is one `error:` line before anything loads; the server answers
/health with 503 while the model loads.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

import click

from ..runtime.errors import MiniCPMOError

log = logging.getLogger("minicpmo.server")
# Generations decoded together by default. Measured on 2 shared cores, 1.5B int4 (docs/serving.md,
# `python -m benchmarks.batch_decode`): a step of 4 sequences gave 2.1x one sequence's tokens/s for
# 1.9x its time per token, 8 gave 3.1x for 2.6x and twice the KV memory (4096-token slots: 0.9 GB at
# 1.5B, 1.8 GB at 7B for 4). 4 keeps each stream's time per token under twice a lone stream's.
DEFAULT_PARALLEL = 4


def run_serve(model: Path, *, runtime: dict, served_names: tuple[str, ...], cors_origins: str | None,
              **settings) -> None:
    try:
        from ..runtime.server import ServerSettings
        from ..runtime.server import serve as run_server
    except ImportError as e:
        raise MiniCPMOError(f"the server needs its extra: pip install 'minicpmo-onnx[server]' ({e})") from e
    from ..runtime.manifest import load_manifest
    from ..runtime.pipeline import Pipeline

    manifest = load_manifest(model)  # a bad bundle fails here, before the port is bound
    runtime["parallel"] = settings["parallel"] = _parallel(model, manifest, settings["parallel"], runtime["provider"])
    if settings["lookup"] and "logits_start" not in manifest["decoder"]["io"]:
        raise MiniCPMOError(f"--lookup: {model} was exported before prompt lookup existed; re-export it")
    origins = tuple(o.strip() for o in (cors_origins or "").split(",") if o.strip())
    lookup = settings.pop("lookup")
    config = ServerSettings(model_dir=model, served_model_names=served_names, cors_origins=origins,
                            default_lookup=lookup, **settings)
    if not config.api_key and not is_loopback(config.host):
        click.echo(f"warning: serving on {config.host} without an API key: anyone who can reach this address "
                   "can use the model (set --api-key or MINICPMO_API_KEY)", err=True)
    run_server(lambda: Pipeline.load(model, speech=True, **runtime), config)  # speech: loaded before the first request


def _parallel(model: Path, manifest, parallel: int | None, provider: str) -> int:
    """--parallel, or the default where the bundle and provider allow it (else one at a time)."""
    from ..runtime.batch_decoder import why_not_batched

    wanted = DEFAULT_PARALLEL if parallel is None else parallel
    reason = why_not_batched(manifest, provider) if wanted > 1 else None
    if reason is None:
        return wanted
    if parallel is not None:
        raise MiniCPMOError(f"--parallel {parallel}: {model}: {reason}")
    log.warning("serving one request at a time: %s", reason)
    return 1


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to loopback addresses (localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
