"""manifest.json: the contract between the exporter and the runtime (the only file the runtime reads
to learn about a bundle). The exporter imports this module to write it; the runtime to check it.
"""

from __future__ import annotations

import hashlib
import json
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


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} for the manifest."""
    return {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in names}


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
    _require(data, ("decoder", "embeddings", "tokenizer", "preprocessing", "files"), str(path))
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
