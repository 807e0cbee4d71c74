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

import math
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .errors import BundleError, InputError
from .manifest import Manifest
from .sessions import create_session

MASKED = np.finfo(np.float32).min  # what upstream's masks add (torch.finfo(dtype).min)
FIRST_CODES = 256  # code frames the cache holds before it first grows (5.5 s of audio)


class SpeechCache:
    """The TTS decoder's KV cache: per layer a key and a value buffer [1, heads, capacity, head_dim],
    bound as past and present (GroupQueryAttention writes new positions in place). It starts with room
    for the condition and FIRST_CODES code frames and doubles, copying what it holds, up to `limit`:
    at the real shape a position costs 120 KB, and upstream's 2,048-code limit would hold 289 MB for
    every utterance, most of them a few seconds long."""

    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, limit: int, names: dict[str, str]):
        self.shape, self.limit, self.names, self.length = (layers, heads, head_dim), limit, names, 0
        self._allocate(min(capacity, limit))

    def _allocate(self, capacity: int) -> None:
        layers, heads, head_dim = self.shape
        self.capacity = capacity
        # ortvalue_from_numpy wraps the arrays' memory (CPU): the arrays must outlive the OrtValues
        self.arrays = [[np.zeros((1, heads, capacity, head_dim), np.float32) for _ in range(2)] for _ in range(layers)]
        self.values = [[ort.OrtValue.ortvalue_from_numpy(a) for a in kv] for kv in self.arrays]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for kv in self.arrays for a in kv)

    def reserve(self, total: int) -> bool:
        """Make room for `total` positions; True when the buffers moved (they must be bound again)."""
        if total <= self.capacity:
            return False
        if total > self.limit:
            raise InputError(f"the TTS cache holds at most {self.limit} positions; this would need {total}")
        old = self.arrays
        self._allocate(min(self.limit, max(total, 2 * self.capacity)))
        for kv_old, kv_new in zip(old, self.arrays, strict=True):
            for a, b in zip(kv_old, kv_new, strict=True):
                b[:, :, :self.length] = a[:, :, :self.length]
        return True

    def bind(self, io: ort.IOBinding) -> None:
        n = self.names
        for i, (k, v) in enumerate(self.values):
            io.bind_ortvalue_input(n["past_key"].format(i=i), k)
            io.bind_ortvalue_input(n["past_value"].format(i=i), v)
            io.bind_ortvalue_output(n["present_key"].format(i=i), k)
            io.bind_ortvalue_output(n["present_value"].format(i=i), v)


@dataclass(frozen=True)
class SpeechConfig:
    """The manifest's "speech" numbers the model steps need."""
    num_vq: int
    num_audio_tokens: int
    hidden_size: int
    llm_dim: int
    condition_length: int
    reserved_text_length: int
    num_spk_embs: int
    text_chunk_size: int
    audio_chunk_size: int
    spk_emb_token_id: int
    audio_bos_token_id: int
    special_ids: dict

    @classmethod
    def from_manifest(cls, speech) -> SpeechConfig:
        names = [f for f in cls.__dataclass_fields__ if f != "special_ids"]
        return cls(**{f: speech[f] for f in names}, special_ids=dict(speech["tokenizer"]["special_ids"]))


class TTSModel:
    """One speech model; one utterance at a time (it owns one KV cache)."""

    def __init__(self, cfg: SpeechConfig, sessions: dict[str, ort.InferenceSession], tables: dict[str, np.ndarray],
                 tokenizer: Tokenizer, io_names: dict[str, str], cache_limit: int, dims: tuple[int, int, int]):
        self.cfg, self.tokenizer, self.names = cfg, tokenizer, io_names
        self._decoder, self._dvae, self._vocos = sessions["decoder"], sessions["dvae"], sessions["vocos"]
        self.emb_text, self.emb_code = tables["emb_text"], tables["emb_code"]
        self._projector = [tables[f"projector.{n}"] for n in
                           ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")]
        self.kv = SpeechCache(*dims, cfg.condition_length + FIRST_CODES, cache_limit, io_names)
        self._io = self._decoder.io_binding()
        self.kv.bind(self._io)
        self.text_mask = np.ones(cfg.condition_length, np.int8)

    @classmethod
    def load(cls, manifest: Manifest, *, threads: int | None = None, max_codes: int | None = None) -> TTSModel:
        """Open the speech graphs and tables a manifest lists; BundleError when it has no speech.
        max_codes: the most code frames the cache may grow to hold (default: the manifest's max_new_codes)."""
        speech = manifest.get("speech")
        if speech is None:
            raise BundleError(f"{manifest.folder}: the bundle has no speech model (exported with --no-tts, "
                              "or from a checkpoint without tts.* weights)")
        cfg = SpeechConfig.from_manifest(speech)
        dec = speech["decoder"]
        sessions = {"decoder": create_session(manifest.path(dec["file"]), "cpu", threads)}
        for part in ("dvae", "vocos"):
            sessions[part] = create_session(manifest.path(speech[part]["file"]), "cpu", threads, memory_arena=False)
        with np.load(manifest.path(speech["tables"]["file"])) as npz:
            tables = {k: npz[k] for k in npz.files}
        tokenizer = Tokenizer.from_file(str(manifest.path(speech["tokenizer"]["file"])))
        _check(manifest, sessions["decoder"], tables, cfg)
        # the condition's 302 positions, then one per code frame (the bos step yields the first)
        length = min(dec["max_position_embeddings"], cfg.condition_length - 1 + (max_codes or speech["max_new_codes"]))
        return cls(cfg, sessions, tables, tokenizer, dict(dec["io"]), length,
                   (dec["num_layers"], dec["num_attention_heads"], dec["head_dim"]))

    # ------------------------------------------------------------ condition
    def speaker_embedding(self, hidden: np.ndarray) -> np.ndarray:
        """The LLM's last hidden state at `<|spk|>` ([llm_dim], or [n, llm_dim]) projected to the TTS
        width and L2-normalized (upstream `tts.projector` + `F.normalize`): float32 [hidden_size]."""
        h = np.asarray(hidden, np.float32)
        if h.shape[-1] != self.cfg.llm_dim:
            raise InputError(f"speaker hidden state has width {h.shape[-1]}, the LLM's is {self.cfg.llm_dim}")
        w1, b1, w2, b2 = self._projector
        x = np.maximum(h @ w1.T + b1, 0) @ w2.T + b2
        return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)

    def text_input(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """`[Stts][spk_emb]{text}[Etts][PAD]...[Ptts]` as ChatTTS token ids, int64 [condition_length]
        (303), and upstream's `_build_streaming_mask`, int8 [303] (1 for [Stts], [spk_emb], the text,
        [Etts] and the last position). A text of 300 tokens or more is cut to its first 300 and has no
        [Etts], as upstream `prepare_tts_text` does (upstream decodes the 300 ids to text and encodes
        that again; the ids are kept here, the same ones wherever WordPiece round-trips)."""
        sp, reserved = self.cfg.special_ids, self.cfg.reserved_text_length
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        lead = [sp["[Stts]"]] + [sp["[spk_emb]"]] * self.cfg.num_spk_embs
        if len(ids) < reserved:
            tail = [sp["[Etts]"]] + [sp["[PAD]"]] * (reserved - len(ids) - 1)
        else:
            ids, tail = ids[:reserved], []
        seq = np.array(lead + ids + tail + [sp["[Ptts]"]], dtype=np.int64)
        mask = np.zeros(self.cfg.condition_length, np.int8)
        mask[:len(lead) + len(ids) + 1] = 1
        mask[-1] = 1
        return seq, mask

    def prefill(self, text_ids: np.ndarray, spk_emb: np.ndarray, mask: np.ndarray | None = None, *,
                chunk_size: int | None = 10) -> None:
        """Start a new utterance: empty the cache, write `spk_emb` over the `[spk_emb]` row and run
        the condition's first 302 positions into the cache in upstream's chunks (12, then
        `chunk_size` = 10 at a time). `mask` (default: every position not [PAD]) decides which text
        positions the codes see.

        Text prefill is causal attention over the text alone, so `chunk_size=None` (one pass) gives the
        same cache to float rounding, ~1.8x faster at the real shape (one 302-row GEMM per weight)."""
        ids = np.asarray(text_ids, np.int64)
        n = self.cfg.condition_length
        if ids.shape != (n,):
            raise InputError(f"TTS text ids must be [{n}] (text_input's), got {list(ids.shape)}")
        self.kv.length = 0
        self.set_text_mask(mask if mask is not None else (ids != self.cfg.special_ids["[PAD]"]).astype(np.int8))
        bounds = [0, n - 1]
        if chunk_size:
            lead = 1 + self.cfg.num_spk_embs
            bounds = [0, *range(lead + chunk_size, n - 1, chunk_size), n - 1]
        for a, b in zip(bounds, bounds[1:], strict=False):
            self.prefill_text(ids[a:b], a, spk_emb if a == 0 else None)

    def prefill_text(self, ids: np.ndarray, start: int, spk_emb: np.ndarray | None = None) -> None:
        """Run condition positions [start, start + len(ids)) into the cache (streaming text: upstream
        `prefill_text` with position_ids = arange(start, ...)); start must be the cache length.
        `spk_emb` is written over the chunk's [spk_emb] rows."""
        if start != self.position:
            raise InputError(f"TTS prefill at position {start}, but the cache holds {self.position} positions")
        ids = np.asarray(ids, np.int64)
        embeds = self.emb_text[ids].copy()
        spk_rows = ids == self.cfg.spk_emb_token_id
        if spk_rows.any():
            if spk_emb is None:
                raise InputError("the TTS text holds [spk_emb] but no speaker embedding was given")
            embeds[spk_rows] = np.asarray(spk_emb, np.float32)
        s, total = len(ids), start + len(ids)
        bias = np.triu(np.full((s, total), MASKED, np.float32), start + 1)  # causal
        self._run(embeds, bias)

    def set_text_mask(self, mask: np.ndarray) -> None:
        """Replace the text visibility mask ([303], as `text_input` returns) for the next steps."""
        mask = np.asarray(mask)
        if mask.shape != (self.cfg.condition_length,):
            raise InputError(f"TTS text mask must be [{self.cfg.condition_length}], got {list(mask.shape)}")
        self.text_mask = mask.astype(np.int8)

    # ------------------------------------------------------------ codes
    def step(self, codes: np.ndarray | None) -> np.ndarray:
        """One audio position: `None` feeds the audio bos ([Ptts]) (at position 302 after `prefill`),
        otherwise the previous step's codes [num_vq] (their four `emb_code` rows summed). The attention
        mask is upstream's `make_streaming_chunk_mask_generation`. Returns raw logits [num_vq, 626]
        float32 (before temperature; code 625 is the end)."""
        if codes is None:
            embeds = self.emb_text[[self.cfg.audio_bos_token_id]]
        else:
            c = np.asarray(codes, np.int64).reshape(-1)
            if c.shape != (self.cfg.num_vq,) or c.min() < 0 or c.max() >= self.cfg.num_audio_tokens:
                raise InputError(f"codes must be {self.cfg.num_vq} ints in [0, {self.cfg.num_audio_tokens})")
            embeds = self.emb_code[np.arange(self.cfg.num_vq), c].sum(0, keepdims=True)
        return self._run(embeds, self.generation_bias(self.position)[None])[0]

    def generation_bias(self, past: int) -> np.ndarray:
        """Upstream make_streaming_chunk_mask_generation for the position after `past` cached ones:
        the text after the chunks unlocked so far (10 more per 50 code frames) and the text mask's
        zeros are hidden. [past + 1] float32."""
        cfg = self.cfg
        lead = 1 + cfg.num_spk_embs
        bias = np.zeros(past + 1, np.float32)
        unlocked = math.ceil((past - cfg.reserved_text_length) / cfg.audio_chunk_size) * cfg.text_chunk_size
        bias[min(unlocked, cfg.reserved_text_length) + lead:cfg.condition_length] = MASKED
        n = min(cfg.condition_length, past + 1)
        bias[:n][self.text_mask[:n] == 0] = MASKED
        return bias

    @property
    def position(self) -> int:
        """How many positions the cache holds (302 after `prefill`, + 1 per step)."""
        return self.kv.length

    def truncate(self, length: int) -> None:
        """Forget cache positions >= length (to regenerate the last steps)."""
        self.kv.length = min(self.kv.length, max(0, length))

    def _run(self, embeds: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """Run the decoder over the S new positions of `embeds`; their logits [S, num_vq, 626]."""
        s, total = embeds.shape[0], self.position + embeds.shape[0]
        if self.kv.reserve(total):
            self.kv.bind(self._io)
        io, n = self._io, self.names
        io.bind_cpu_input(n["inputs_embeds"], np.ascontiguousarray(embeds[None], np.float32))
        io.bind_cpu_input(n["attention_bias"], np.ascontiguousarray(bias[None, None], np.float32))
        io.bind_cpu_input(n["seqlens_k"], np.array([total - 1], np.int32))
        io.bind_cpu_input(n["total_sequence_length"], np.array(total, np.int32))
        logits = ort.OrtValue.ortvalue_from_shape_and_type((1, s, self.cfg.num_vq, self.cfg.num_audio_tokens),
                                                           np.float32)
        io.bind_ortvalue_output(n["logits"], logits)
        self._decoder.run_with_iobinding(io)
        self.kv.length = total
        return logits.numpy()[0]

    # ------------------------------------------------------------ audio
    def codes_to_mel(self, codes: np.ndarray) -> np.ndarray:
        """DVAE decoder: codes int [T, num_vq] (each < 625) -> mel float32 [100, 2T]."""
        c = np.asarray(codes, np.int64)
        if c.ndim != 2 or c.shape[1] != self.cfg.num_vq:
            raise InputError(f"codes must be [T, {self.cfg.num_vq}], got {list(c.shape)}")
        eos = self.cfg.num_audio_tokens - 1
        if c.size and (c.min() < 0 or c.max() >= eos):
            raise InputError(f"codes for the DVAE must be in [0, {eos}) (the end code {eos} is not audio)")
        if not len(c):
            return np.zeros((100, 0), np.float32)
        return self._dvae.run(None, {self._dvae.get_inputs()[0].name: np.ascontiguousarray(c.T[None])})[0][0]

    def mel_to_audio(self, mel: np.ndarray) -> np.ndarray:
        """Vocos: mel [100, F] -> float32 waveform [F * 256] at 24 kHz."""
        m = np.asarray(mel, np.float32)
        if m.ndim != 2:
            raise InputError(f"mel must be [bins, frames], got {list(m.shape)}")
        if not m.shape[1]:
            return np.zeros(0, np.float32)
        return self._vocos.run(None, {self._vocos.get_inputs()[0].name: np.ascontiguousarray(m[None])})[0][0]


def _check(manifest: Manifest, decoder: ort.InferenceSession, tables: dict[str, np.ndarray], cfg: SpeechConfig) -> None:
    """The tables and the decoder graph agree with the manifest's widths (a mismatch names the field)."""
    io = manifest["speech"]["decoder"]["io"]
    width = {i.name: i.shape for i in decoder.get_inputs()}[io["inputs_embeds"]][-1]
    logits = {o.name: o.shape for o in decoder.get_outputs()}[io["logits"]]
    want = {"speech.hidden_size": (cfg.hidden_size, width), "speech.tables emb_text width": (cfg.hidden_size,
            tables["emb_text"].shape[1]), "speech.tables emb_code": ((cfg.num_vq, cfg.num_audio_tokens),
            tables["emb_code"].shape[:2]), "speech.num_vq": (cfg.num_vq, logits[2]),
            "speech.num_audio_tokens": (cfg.num_audio_tokens, logits[3]),
            "speech.llm_dim": (cfg.llm_dim, tables["projector.linear1.weight"].shape[1])}
    for field, (value, actual) in want.items():
        if value != actual:
            raise BundleError(f"{manifest.path('manifest.json')}: {field} is {value}, but the speech files hold "
                              f"{actual} (re-export the bundle)")
