"""16 kHz waveforms -> audio graph -> [n_tokens, D] embeddings per clip (no torch).

Upstream encodes every 30 s piece of every clip of a prompt in ONE padded batch. Padding is not fully
masked there (see export/audio.py), so a piece's last partial 1 s chunk also attends to the zero
padding up to that chunk's end. To reproduce that exactly without paying for the padded batch, each
piece is run alone, zero-padded only as far as upstream's padding can reach it: to the end of its last
attention chunk, capped at the batch's longest piece.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .preprocess.audio import N_MELS, encoder_frames, log_mel_features, piece_token_count, split_pieces

INPUT_FEATURES, INPUT_LENS, OUTPUT = "input_features", "feature_lens", "audio_embeds"


class AudioEncoder:
    """Runs the exported audio graph.

    Args:
        session: ONNX Runtime session of the audio graph.
        chunk_frames: encoder frames per attention chunk (upstream int(audio_chunk_length * 50) = 50);
            0 means full attention.
        pool_step: upstream audio_pool_step (2).
    """

    def __init__(self, session: ort.InferenceSession, *, chunk_frames: int = 50, pool_step: int = 2):
        self.session = session
        self.chunk_frames = chunk_frames
        self.pool_step = pool_step
        width = session.get_outputs()[0].shape[-1]
        self.hidden_size = width if isinstance(width, int) else None

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """One clip on its own (as upstream when it is the prompt's only audio): [n_tokens, D] float32."""
        return self.encode_batch([samples])[0]

    def encode_batch(self, clips: Sequence[np.ndarray]) -> list[np.ndarray]:
        """All clips of one prompt, with upstream's one-batch semantics: per clip [n_tokens, D] float32.

        Clips are float32 16 kHz mono waveforms (after upstream's merging of consecutive clips of one
        message, see preprocess.audio.merge_message_clips); each is cut into 30 s pieces.
        """
        feats = [[log_mel_features(p) for p in split_pieces(np.asarray(c, np.float32))] if len(c) else []
                 for c in clips]
        frames = [f.shape[1] for fs in feats for f in fs]
        if not frames:
            return [self._empty() for _ in clips]
        batch_frames = max(frames)
        return [self._concat([self._run_piece(f, batch_frames) for f in fs]) for fs in feats]

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.hidden_size or 0), np.float32)

    def _concat(self, parts: list[np.ndarray]) -> np.ndarray:
        parts = [p for p in parts if len(p)]
        return np.concatenate(parts) if parts else self._empty()

    def padded_frames(self, frames: int, batch_frames: int) -> int:
        """Mel frames to feed for a piece of `frames` so that it matches upstream's padded batch."""
        if self.chunk_frames <= 0:
            return batch_frames  # full attention: every padded frame is visible
        reach = math.ceil(encoder_frames(frames) / self.chunk_frames) * self.chunk_frames
        return max(frames, min(batch_frames, 2 * reach))

    def _run_piece(self, features: np.ndarray, batch_frames: int) -> np.ndarray:
        """features [80, F] -> [T, D] with T = upstream's token count for F frames."""
        frames = features.shape[1]
        tokens = piece_token_count(frames, pool_step=self.pool_step)
        if tokens == 0:  # under 321 samples: upstream keeps no token (its lone-clip path even crashes)
            return self._empty()
        x = np.zeros((1, N_MELS, self.padded_frames(frames, batch_frames)), np.float32)
        x[0, :, :frames] = features
        feeds = {INPUT_FEATURES: x, INPUT_LENS: np.array([frames], np.int64)}
        out = self.session.run([OUTPUT], feeds)[0]
        return np.ascontiguousarray(out[0, :tokens], dtype=np.float32)
