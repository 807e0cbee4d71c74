"""manifest.json: the contract between the exporter and the runtime (the only file the runtime reads
to learn about a bundle). The exporter imports this module to write it; the runtime to check it.

The manifest covers itself: `digests` holds a short sha256 of every field, two levels deep
("decoder" -> "num_layers"), written by `write_manifest`. Loading recomputes them, so an edited or
corrupted field (a flipped byte in a key or a value) is refused with its name, before any graph is
opened. Every other file is covered by its size and sha256 under `files`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT = "minicpmo-onnx-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Files above this size are checked by size on every load and fully hashed only on request
# (`verify=True`): hashing 5 GB costs ~10 s, too much for every start of an edge box.
FULL_HASH_LIMIT = 256 * 1024 * 1024
DIGESTS = "digests"
DIGEST_CHARS = 16  # 64 bits of sha256 per field: corruption and edits, not an adversary, are the concern


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str],
                   progress: Callable[[int, int], None] | None = None) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} for the manifest; progress(done, total) before and after each file."""
    out = {}
    for i, n in enumerate(names):
        if progress:
            progress(i, len(names))
        out[n] = {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)}
    if progress:
        progress(len(names), len(names))
    return out


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def field_digests(data: dict[str, Any]) -> dict[str, Any]:
    """{field: digest} for scalar and list fields, {section: {field: digest}} for sections."""
    return {key: {k: _digest(v) for k, v in value.items()} if isinstance(value, dict) else _digest(value)
            for key, value in data.items() if key != DIGESTS}


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write manifest.json with its digests (data gets them too)."""
    data[DIGESTS] = field_digests(data)
    (folder / MANIFEST).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_digests(data: dict[str, Any], where: str) -> None:
    """Raise BundleError naming the first field that differs from its digest (no digests: nothing to check)."""
    stored = data.get(DIGESTS)
    if stored is None:
        return
    if not isinstance(stored, dict):
        raise BundleError(f"{where}: field '{DIGESTS}' is altered (not an object)")
    actual = field_digests(data)
    for key in sorted(set(stored) | set(actual)):
        want, have = stored.get(key), actual.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            name = next((f"{key}.{k}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)), None)
        else:
            name = key if want != have else None
        if name is not None:
            how = ("is missing" if _missing(data, name) else
                   "was added after export" if _added(stored, name) else "differs from its digest")
            raise BundleError(f"{where}: field '{name}' {how}: the manifest was altered or corrupted after "
                              "export (re-export the bundle)")


def _missing(data: dict, name: str) -> bool:
    key, _, sub = name.partition(".")
    return key not in data or (bool(sub) and sub not in data[key])


def _added(stored: dict, name: str) -> bool:
    key, _, sub = name.partition(".")
    return key not in stored or (bool(sub) and isinstance(stored[key], dict) and sub not in stored[key])


class Fields(dict):
    """A manifest section: reading a field it lacks raises BundleError naming it (not a KeyError)."""

    def __init__(self, items: dict, where: str, prefix: str = ""):
        super().__init__(items)
        self.where, self.prefix = where, prefix

    def __missing__(self, key: str):
        raise BundleError(f"{self.where}: missing field '{self.prefix}{key}' (re-export the bundle)")


def _fields(value: Any, where: str, prefix: str = "") -> Any:
    if isinstance(value, dict):
        return Fields({k: _fields(v, where, f"{prefix}{k}.") for k, v in value.items()}, where, prefix)
    if isinstance(value, list):
        return [_fields(v, where, f"{prefix[:-1]}[{i}].") for i, v in enumerate(value)]
    return value


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def name(self) -> str:
        return self.data.get("name") or self.folder.name


def _require(data: dict, keys: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in data:
            raise BundleError(f"{where}: missing field '{key}'")


def load_manifest(folder: str | Path, *, verify: bool = False) -> Manifest:
    """Read and check a bundle: format, version, every listed file present with its size and hash.

    Raises BundleError naming the first problem.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a bundle folder (it does not exist or is not a directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST} (not an exported bundle, or the export did not finish)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {data.get('format_version')!r} is not supported "
                          f"(this runtime reads version {FORMAT_VERSION}); re-export the bundle")
    check_digests(data, str(path))
    _require(data, ("decoder", "embeddings", "tokenizer", "preprocessing", "files"), str(path))
    data = _fields(data, str(path))
    for name, info in data["files"].items():
        check_file(folder, name, info, full_hash=verify or info["bytes"] <= FULL_HASH_LIMIT)
    return Manifest(folder, data)


def check_file(folder: Path, name: str, info: dict[str, Any], *, full_hash: bool) -> None:
    f = folder / name
    if not f.is_file():
        raise BundleError(f"{folder}: file '{name}' listed in the manifest is missing")
    size = f.stat().st_size
    if size != info["bytes"]:
        raise BundleError(f"{folder}: file '{name}' has {size} bytes, the manifest says {info['bytes']} "
                          "(truncated or altered)")
    if full_hash and sha256_file(f) != info["sha256"]:
        raise BundleError(f"{folder}: file '{name}' does not match its sha256 in the manifest (altered or corrupt)")
