"""The speech part of a bundle: tts_decoder.onnx, tts_tables.npz, dvae_decoder.onnx, vocos.onnx,
tts_tokenizer.json, and the manifest's "speech" section (docs/speech.md, "Bundle contract")."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .checkpoint import Checkpoint
from .dvae import INPUT as DVAE_INPUT
from .dvae import OUTPUT as DVAE_OUTPUT
from .dvae import build_dvae_graph
from .graph import GraphBuilder
from .options import ExportOptions
from .synth_tts import TOKENIZER_DIR, VOCOS_FILE
from .torch_zip import TorchZipError, load_state_dict
from .tts import IO as TTS_IO
from .tts import LinearSettings, build_tts_decoder_graph
from .tts_tensors import vocos_sizes, vocos_tensors
from .vocos import INPUT as VOCOS_INPUT
from .vocos import OUTPUT as VOCOS_OUTPUT
from .vocos import build_vocos_graph

SPECIAL_TOKENS = ("[Stts]", "[spk_emb]", "[Etts]", "[PAD]", "[Ptts]")
# upstream _generate_mel_spec / ConditionalChatTTS.generate / gen_logits
SAMPLING = {"temperature": [0.1, 0.3, 0.1, 0.3], "repetition_window": 16, "min_tokens_to_keep": 3}
OUTPUT_CHUNK, MIN_NEW_CODES, MAX_NEW_CODES = 25, 10, 2048
SAMPLE_RATE, HOP = 24000, 256


class SpeechExportError(ValueError):
    """The checkpoint's speech files are missing or unreadable."""


def read_vocos(ckpt: Checkpoint) -> tuple[dict[str, np.ndarray], int]:
    """assets/Vocos.pt as {name: float32 array}, checked against upstream's layout; and its layer count."""
    path = ckpt.folder / VOCOS_FILE
    if not path.is_file():
        raise SpeechExportError(f"{ckpt.folder}: no {VOCOS_FILE} (the vocoder); export with --no-tts to skip speech")
    try:
        state = {k: v.astype(np.float32) for k, v in load_state_dict(path).items()}
    except TorchZipError as e:
        raise SpeechExportError(str(e)) from None
    layers = sum(1 for k in state if k.startswith("backbone.convnext.") and k.endswith(".gamma"))
    try:
        want = vocos_tensors(vocos_sizes(state, layers))
    except KeyError as e:
        raise SpeechExportError(f"{path}: no tensor {e} (not a Vocos state dict)") from None
    for name, shape in want.items():
        if name not in state or state[name].shape != shape:
            got = list(state[name].shape) if name in state else "missing"
            raise SpeechExportError(f"{path}: tensor '{name}' is {got}, expected {list(shape)}")
    return state, layers


def _save(folder: Path, name: str, build) -> GraphBuilder:
    g = GraphBuilder(name, folder / f"{name}.onnx.data")
    build(g)
    g.save(folder / f"{name}.onnx")
    return g


def _tables(ckpt: Checkpoint, path: Path, num_vq: int) -> dict:
    arrays = {"emb_text": ckpt.read("tts.emb_text.weight"),
              "emb_code": np.stack([ckpt.read(f"tts.emb_code.{q}.weight") for q in range(num_vq)])}
    for layer in ("linear1", "linear2"):
        for kind in ("weight", "bias"):
            arrays[f"projector.{layer}.{kind}"] = ckpt.read(f"tts.projector.{layer}.{kind}")
    np.savez(path, **arrays)
    return {"file": path.name, "arrays": {k: list(v.shape) for k, v in arrays.items()}}


def _tokenizer(ckpt: Checkpoint, folder: Path) -> dict:
    src = ckpt.folder / TOKENIZER_DIR / "tokenizer.json"
    if not src.is_file():
        raise SpeechExportError(f"{ckpt.folder}: no {TOKENIZER_DIR}/tokenizer.json (the ChatTTS tokenizer); "
                                "export with --no-tts to skip speech")
    shutil.copyfile(src, folder / "tts_tokenizer.json")
    tok = Tokenizer.from_file(str(src))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise SpeechExportError(f"{src}: no token {missing[0]}")
    return {"file": "tts_tokenizer.json", "special_ids": ids, "vocab_size": tok.get_vocab_size()}


def write_speech(ckpt: Checkpoint, folder: Path, opts: ExportOptions, graph_io: Callable[[GraphBuilder], dict],
                 progress: Callable[..., None]) -> dict:
    """Write the speech files into `folder`; return the manifest's "speech" section (its quantization
    errors stay in it, apart from the LLM's)."""
    cfg = ckpt.tts_config()
    vocos_state, vocos_layers = read_vocos(ckpt)
    tokenizer = _tokenizer(ckpt, folder)  # the speech inputs are checked before any graph is built
    dvae_layers = sum(1 for k in ckpt.keys() if k.startswith("tts.dvae.decoder.decoder_block.") and k.endswith(".coef"))
    lin = LinearSettings(opts.tts_precision, opts.block_size, opts.accuracy_level)
    errors: dict[str, float] = {}
    record = errors.__setitem__

    progress("speech", 0, 3, "graphs")
    dec = _save(folder, "tts_decoder", lambda g: build_tts_decoder_graph(g, cfg, ckpt.read, lin, record))
    progress("speech", 1, 3, "graphs")
    dvae = _save(folder, "dvae_decoder", lambda g: build_dvae_graph(g, ckpt.read, dvae_layers))
    progress("speech", 2, 3, "graphs")
    vocos = _save(folder, "vocos", lambda g: build_vocos_graph(g, vocos_state, vocos_layers, HOP))
    progress("speech", 3, 3, "graphs")
    graphs = {"decoder": graph_io(dec), "dvae": graph_io(dvae), "vocos": graph_io(vocos)}
    return _section(cfg, opts, graphs, errors, int(vocos_state["head.istft.window"].shape[0])) | {
        "tables": _tables(ckpt, folder / "tts_tables.npz", cfg.num_vq), "tokenizer": tokenizer}


def _section(cfg, opts: ExportOptions, graphs: dict, errors: dict[str, float], n_fft: int) -> dict:
    """The manifest's "speech" fields (docs/speech.md), less the tables and the tokenizer."""
    return {
        "decoder": {"file": "tts_decoder.onnx", **graphs["decoder"],
                    "io": {k: getattr(TTS_IO, k) for k in TTS_IO.__dataclass_fields__},
                    "num_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
                    "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size,
                    "max_position_embeddings": cfg.max_position_embeddings, "precision": opts.tts_precision},
        "dvae": {"file": "dvae_decoder.onnx", **graphs["dvae"], "input_name": DVAE_INPUT, "output_name": DVAE_OUTPUT},
        "vocos": {"file": "vocos.onnx", **graphs["vocos"], "input_name": VOCOS_INPUT, "output_name": VOCOS_OUTPUT,
                  "n_fft": n_fft},
        "num_vq": cfg.num_vq, "num_audio_tokens": cfg.num_audio_tokens, "eos_code": cfg.num_audio_tokens - 1,
        "num_spk_embs": cfg.num_spk_embs, "spk_emb_token_id": cfg.spk_emb_token_id,
        "audio_bos_token_id": cfg.audio_bos_token_id, "text_eos_token_id": cfg.text_eos_token_id,
        "reserved_text_length": cfg.streaming_text_reserved_len, "condition_length": cfg.condition_length,
        "text_chunk_size": cfg.streaming_text_chunk_size, "audio_chunk_size": cfg.streaming_audio_chunk_size,
        "output_chunk_size": OUTPUT_CHUNK, "min_new_codes": MIN_NEW_CODES, "max_new_codes": MAX_NEW_CODES,
        "sampling": {**SAMPLING, "top_p": cfg.top_p, "top_k": cfg.top_k, "repetition_penalty": cfg.repetition_penalty},
        "sample_rate": SAMPLE_RATE, "hop_length": HOP, "num_mel_bins": cfg.num_mel_bins,
        "llm_dim": cfg.llm_dim, "hidden_size": cfg.hidden_size,
        "quantization": {"precision": opts.tts_precision,
                         "relative_error_max": max(errors.values(), default=0.0),
                         "relative_error_mean": float(np.mean(list(errors.values()))) if errors else 0.0,
                         "per_tensor": {k: round(e, 6) for k, e in errors.items()}},
    }
