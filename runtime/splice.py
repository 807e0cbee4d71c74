"""Scatter image (or audio) embeddings into the token embeddings at their placeholder rows."""

from __future__ import annotations

import numpy as np


def splice_embeddings(text_embeds: np.ndarray, media_embeds: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Write media_embeds [R, D] into text_embeds [T, D] at the rows of bounds [n, 2] ([start, end)).

    Raises ValueError when the placeholder rows and the media rows differ in number: a silent
    truncation would shift every later image onto the wrong placeholders.
    """
    bounds = np.asarray(bounds, dtype=np.int64).reshape(-1, 2)
    rows = np.concatenate([np.arange(s, e) for s, e in bounds]) if len(bounds) else np.zeros(0, np.int64)
    if len(rows) != len(media_embeds):
        raise ValueError(f"prompt has {len(rows)} placeholder positions but {len(media_embeds)} "
                         "embedding rows were computed for its media")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(text_embeds)):
        raise ValueError("placeholder bounds fall outside the prompt")
    out = text_embeds.copy()
    out[rows] = media_embeds
    return out
