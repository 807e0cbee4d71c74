"""A stand-in for the TTS graphs (runtime.tts_model.TTSModel's methods, numpy only) for testing the
speech loop and its plumbing on their own: seeded logits, and a DVAE/Vocos pair that is local (each
code's samples depend on that code only), so decoding in overlapping chunks must give exactly what
decoding all codes at once gives."""

from __future__ import annotations

import numpy as np

SAMPLES_PER_FRAME = 256
ETTS = 21133


class FakeSpeechModel:
    reserved_text_length = 300

    def __init__(self, llm_dim: int = 64, end_after: int | None = None, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.projector = rng.standard_normal((16, llm_dim)).astype(np.float32)
        self.end_after, self.seed = end_after, seed
        self.steps = 0  # step calls since the last prefill
        self.prefills: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.decoded: list[int] = []  # codes decoded per codes_to_mel call
        self.hiddens: list[np.ndarray] = []  # the speaker conditions it was given

    def speaker_embedding(self, hidden):
        self.hiddens.append(np.array(hidden))
        v = self.projector @ np.asarray(hidden, dtype=np.float32)
        return v / np.linalg.norm(v)

    def text_input(self, text):
        body = [100 + (ord(c) % 500) for c in text][:300]
        ids = [1, 2, *body] + ([ETTS] + [0] * (299 - len(body)) if len(body) < 300 else []) + [3]
        mask = np.zeros(303, np.int8)
        mask[:min(303, 3 + len(body))] = 1
        mask[-1] = 1
        return np.asarray(ids, np.int64), mask

    def prefill(self, text_ids, spk_emb, mask=None):
        self.prefills.append((np.asarray(text_ids), np.asarray(spk_emb), mask))
        self.steps = 0
        self._rng = np.random.default_rng([self.seed, int(np.asarray(text_ids).sum()) % 10_000])

    def step(self, codes):
        assert (codes is None) == (self.steps == 0), "the first step feeds the audio bos, later ones codes"
        self.steps += 1
        logits = self._rng.standard_normal((4, 626)).astype(np.float32) * 3
        logits[:, 625] = 50.0 if self.end_after is not None and self.steps > self.end_after else -50.0
        return logits

    def codes_to_mel(self, codes):
        codes = np.asarray(codes)
        self.decoded.append(len(codes))
        frames = np.repeat(codes.sum(axis=1).astype(np.float32) / 2500.0, 2)  # 2 mel frames per code
        return np.tile(frames, (100, 1))

    def mel_to_audio(self, mel):
        return np.repeat(np.asarray(mel)[0], SAMPLES_PER_FRAME).astype(np.float32)
