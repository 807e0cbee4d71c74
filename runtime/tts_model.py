"""The speech model of a bundle (no torch): ChatTTS-style TTS decoder, DVAE decoder, Vocos.

`TTSModel` holds the three graphs, the embedding tables, the projector and the ChatTTS tokenizer
of a bundle's manifest `"speech"` section (docs/speech.md, "Bundle contract"). Its methods are the
plain steps upstream's `MiniCPMO._generate_mel_spec` strings together; the speech loop (sampling,
streaming, overlap-add) calls them:

    model = TTSModel.load(manifest)
    spk = model.speaker_embedding(llm_hidden_at_spk)      # [3584] -> [768], L2-normalized
    ids, mask = model.text_input(reply_text)              # [303] ids, [303] visibility
    model.prefill(ids, spk, mask)                         # condition -> KV cache, chunks of 10
    logits = model.step(None)                             # first step: the audio bos
    logits = model.step(codes)                            # then the last step's 4 codes
    mel = model.codes_to_mel(all_codes)                   # [T, 4] -> [100, 2T]
    wav = model.mel_to_audio(mel)                         # [100, F] -> [F * 256] at 24 kHz
"""

from __future__ import annotations

import numpy as np

from .manifest import Manifest


class TTSModel:
    """One speech model; one conversation at a time (it owns one KV cache)."""

    @classmethod
    def load(cls, manifest: Manifest, *, threads: int | None = None) -> TTSModel:
        """Open the speech graphs and tables a manifest lists; BundleError when it has no speech."""
        raise NotImplementedError

    def speaker_embedding(self, hidden: np.ndarray) -> np.ndarray:
        """The LLM's last hidden state at `<|spk|>` ([llm_dim]) projected to the TTS width and
        L2-normalized (upstream `tts.projector` + `F.normalize`): [hidden_size] float32."""
        raise NotImplementedError

    def text_input(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """`[Stts][spk_emb]{text}[Etts][PAD]...[Ptts]` as ChatTTS token ids, int64 [condition_length]
        (303), and upstream's `_build_streaming_mask`, int8 [303] (1 for [Stts], [spk_emb], the text,
        [Etts] and the last position). A text of 300 tokens or more is cut to its first 300 and has no
        [Etts], as upstream `prepare_tts_text` does."""
        raise NotImplementedError

    def prefill(self, text_ids: np.ndarray, spk_emb: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Start a new utterance: empty the cache, write `spk_emb` over the `[spk_emb]` row and run
        the condition's first 302 positions into the cache in upstream's chunks (12, then 10 at a
        time). `mask` (default: from the ids) decides which text positions the codes may attend to."""
        raise NotImplementedError

    def prefill_text(self, ids: np.ndarray, start: int, spk_emb: np.ndarray | None = None) -> None:
        """Run condition positions [start, start + len(ids)) into the cache (streaming text: upstream
        `prefill_text` with position_ids = arange(start, ...)). `spk_emb` when the chunk holds [spk_emb]."""
        raise NotImplementedError

    def set_text_mask(self, mask: np.ndarray) -> None:
        """Replace the text visibility mask ([303], as `text_input` returns) for the next steps."""
        raise NotImplementedError

    def step(self, codes: np.ndarray | None) -> np.ndarray:
        """One audio position: `None` feeds the audio bos ([Ptts]) at position 302, otherwise the
        previous step's codes [num_vq] (their four `emb_code` rows summed). The attention mask is
        upstream's `make_streaming_chunk_mask_generation`. Returns raw logits [num_vq, 626] float32
        (before temperature; code 625 is the end)."""
        raise NotImplementedError

    @property
    def position(self) -> int:
        """How many positions the cache holds (302 after `prefill`, + 1 per step)."""
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        """Forget cache positions >= length (to regenerate the last steps)."""
        raise NotImplementedError

    def codes_to_mel(self, codes: np.ndarray) -> np.ndarray:
        """DVAE decoder: codes int [T, num_vq] (each < 625) -> mel float32 [100, 2T]."""
        raise NotImplementedError

    def mel_to_audio(self, mel: np.ndarray) -> np.ndarray:
        """Vocos: mel [100, F] -> float32 waveform [F * 256] at 24 kHz."""
        raise NotImplementedError
