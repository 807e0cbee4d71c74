"""Load a checkpoint folder's safetensors into a name -> float32 tensor dict (tiny/small models)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

DEFAULT_PREFIXES = ("llm.", "vpm.", "resampler.")


def load_weights(folder: str | Path, prefixes: Iterable[str] | None = DEFAULT_PREFIXES) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors in `folder` whose name starts with one of `prefixes`
    (None: all), converted to float32."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    keep = tuple(prefixes) if prefixes is not None else None
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if keep is None or name.startswith(keep):
                    weights[name] = f.get_tensor(name).to(torch.float32)
    return weights
