"""export_bundle: checkpoint -> bundle folder. Orchestration only; each step is its own function.

The bundle is written into a temporary sibling folder and moved into place only when complete, so
an interrupted or failed export never leaves a half-written bundle behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from tokenizers import Tokenizer

from ..runtime import manifest as mf
from .audio import INPUTS as AUDIO_INPUTS
from .audio import OUTPUT as AUDIO_OUTPUT
from .audio import build_audio_graph, chunk_frames
from .bundle_speech import write_speech
from .checkpoint import Checkpoint, open_checkpoint
from .decoder import IO as DECODER_IO
from .decoder import build_decoder_graph, compute_dtype, use_int8_kv_cache
from .graph import GraphBuilder
from .imatrix import MAX_CALIBRATION_TOKENS
from .options import ExportOptions
from .staging import staged_folder
from .vision import INPUTS as VISION_INPUTS
from .vision import OUTPUT as VISION_OUTPUT
from .vision import build_vision_graph
from .voices import write_voices

log = logging.getLogger(__name__)
Progress = Callable[..., None]  # (stage, done, total, unit=""): unit names what is counted

# Upstream MiniCPMO.default_tts_chat_template: switched on whenever a conversation holds audio.
TTS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n"
    "<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>' }}{% endif %}"
)
SPECIAL_TOKENS = {  # role -> token text (preprocessor_config.json names these the same way)
    "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
    "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>",
    "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>", "tts_eos": "<|tts_eos|>",
}
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # upstream chat(): terminators


class ExportError(ValueError):
    """The export cannot proceed (bad destination, tokenizer without a needed token, ...)."""


def default_output_dir(source: str | Path, opts: ExportOptions) -> Path:
    base = Path(str(source).rstrip("/")).name or "model"
    return Path("models") / f"{base}-{opts.precision}"


def export_bundle(source: str | Path, out_dir: str | Path | None = None, opts: ExportOptions | None = None,
                  *, overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Export a MiniCPM-o 2.6 checkpoint (folder or hub id) into a bundle folder; returns its path."""
    opts = opts or ExportOptions()
    ckpt = open_checkpoint(source)
    parts = ["vision", "resampler", "decoder"] + (["audio"] if opts.audio and _has_audio(ckpt) else [])
    parts += ["tts"] if opts.tts and ckpt.has_tts() else []
    ckpt.validate(parts=tuple(parts))
    out = Path(out_dir) if out_dir else default_output_dir(source, opts)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    with staged_folder(out) as tmp:
        _write_bundle(ckpt, tmp, out.name, opts, progress or _log_progress, audio="audio" in parts,
                      speech="tts" in parts)
    return out


def _has_audio(ckpt: Checkpoint) -> bool:
    return any(k.startswith("apm.") for k in ckpt.keys())


def _write_bundle(ckpt: Checkpoint, folder: Path, name: str, opts: ExportOptions, progress: Progress,
                  audio: bool = False, speech: bool = False) -> None:
    cfg = ckpt.config
    t0 = time.time()
    quant_errors: dict[str, float] = {}
    record = quant_errors.__setitem__
    graphs = {}
    encoders = [("vision", build_vision_graph)] + ([("audio", build_audio_graph)] if audio else [])
    for name_, build in encoders:
        progress(name_, 0, 1)
        graphs[name_] = write_encoder(folder, name_, opts, lambda g, prec, b=build: b(
            g, cfg, ckpt.read, prec, opts.block_size, opts.accuracy_level, on_error=record))
        progress(name_, 1, 1)
    g = GraphBuilder("decoder", folder / "decoder.onnx.data")
    progress("decoder", 0, cfg.decoder.num_hidden_layers, "layers")
    build_decoder_graph(g, cfg.decoder, ckpt.read, opts, cfg.decoder.max_position_embeddings,
                        on_error=record, progress=lambda i, n: progress("decoder", i, n, "layers"),
                        calibration=_imatrix_sequences(ckpt, opts))
    g.save(folder / "decoder.onnx")
    graphs["decoder"] = g
    progress("embeddings", 0, 1)
    embed = _write_embeddings(ckpt, folder / "embed_tokens.npy")
    progress("embeddings", 1, 1)
    tokenizer = _write_tokenizer(ckpt, folder)
    manifest = _manifest(ckpt, name, opts, graphs, embed, tokenizer, quant_errors)
    if audio:
        manifest["audio"] = {"file": "audio.onnx", **_graph_io(graphs["audio"]), "input_names": list(AUDIO_INPUTS),
                             "output_name": AUDIO_OUTPUT, "chunk_frames": chunk_frames(cfg),
                             "pool_step": cfg.audio_pool_step, "chunk_length_s": cfg.audio_chunk_length,
                             "chunk_input": cfg.chunk_input, "sample_rate": 16000}
    if speech:
        manifest["speech"] = write_speech(ckpt, folder, opts, _graph_io, progress)
        manifest["speech"]["voices"] = write_voices(ckpt.folder, folder, opts.voices)
    manifest["export_seconds"] = round(time.time() - t0, 1)
    files = sorted(p.name for p in folder.iterdir())
    manifest["files"] = mf.describe_files(folder, files, progress=lambda i, n: progress("hashing", i, n, "files"))
    mf.write_manifest(folder, manifest)
    if opts.kv_cache == "int8":
        progress("kv calibration", 0, 1)
        _use_int8_kv_cache(folder, manifest, opts, audio)
        progress("kv calibration", 1, 1)


IMATRIX_SEQUENCE = 512  # calibration tokens per sequence (each starts from an empty context)


def _imatrix_sequences(ckpt: Checkpoint, opts: ExportOptions) -> list[np.ndarray] | None:
    """The importance calibration's token ids: --imatrix-text tokenized, in sequences of 512."""
    if opts.imatrix_text is None:
        return None
    try:
        text = Path(opts.imatrix_text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"imatrix text {opts.imatrix_text}: {e}") from None
    ids = Tokenizer.from_file(str(ckpt.folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    if not ids:
        raise ExportError(f"imatrix text {opts.imatrix_text} is empty")
    ids = np.array(ids, dtype=np.int64)
    sequences = [ids[i:i + IMATRIX_SEQUENCE] for i in range(0, len(ids), IMATRIX_SEQUENCE)]
    keep = max(1, MAX_CALIBRATION_TOKENS // IMATRIX_SEQUENCE)
    if len(sequences) > keep:  # a long text: sequences spread over all of it, not only its start
        sequences = [sequences[i] for i in np.linspace(0, len(sequences) - 1, keep).round().astype(int)]
    return sequences


def _use_int8_kv_cache(folder: Path, manifest: dict, opts: ExportOptions, audio: bool) -> None:
    """Calibrate the finished bundle's fp32 cache, then switch its decoder graph to an int8 cache.
    Only decoder.onnx changes (the weights file is untouched), so only its manifest entry is redone."""
    from ..runtime.errors import InputError
    from .kv_calibration import calibration_conversations, measure_kv_scales

    try:
        conversations = calibration_conversations(opts.kv_calibration_text, audio)
        scales = measure_kv_scales(folder, conversations)
    except (OSError, UnicodeDecodeError, ValueError, InputError) as e:
        raise ExportError(f"KV calibration: {e}") from e
    path = folder / "decoder.onnx"
    model = onnx.load(path, load_external_data=False)
    use_int8_kv_cache(model, scales.keys, scales.values)
    onnx.save(model, path)
    manifest["decoder"].update(_io_of(model.graph.input, model.graph.output), kv_dtype="int8",
                               kv_calibration=scales.summary)
    manifest["files"]["decoder.onnx"] = mf.describe_files(folder, ["decoder.onnx"])["decoder.onnx"]
    mf.write_manifest(folder, manifest)


def write_encoder(folder: Path, name: str, opts: ExportOptions, build) -> GraphBuilder:
    """Write the vision or audio graph. fp32/fp16 are written as built. int8 is built in fp32 and then
    passed through ONNX Runtime's quantize_dynamic (per-channel int8 weights, uint8 activations
    quantized at run time): its int8 GEMM runs ~3x faster than fp32 on CPU for these long sequences,
    where MatMulNBits' 8-bit path gains little (measured in benchmarks/RESULTS.md).

    The weights are 7-bit (`reduce_range`: codes in [-64, 64]) so that every CPU computes the same
    exact integer sums. Without VNNI (AVX2, AVX-512 without VNNI) MLAS's u8 x s8 kernel multiplies
    with vpmaddubsw, which adds two u8*s8 products into a saturating int16: 2 * 255 * 127 overflows
    it, 2 * 255 * 64 = 32640 does not. Full 8-bit weights gave per-slice cosines of 0.986-0.988 to
    fp32 on AVX2 against 0.9997 with VNNI; 7-bit ones give 0.9992 on both, the same numbers on both
    (tests/export/test_int8_portable.py, run under an emulated AVX2 CPU). uint8 weights (MLAS's u8 x u8
    kernel, exact everywhere) keep 0.9997 but run 2.4x slower than u8 x s8 on a VNNI host."""
    if opts.vision_precision != "int8":
        g = GraphBuilder(name, folder / f"{name}.onnx.data")
        build(g, opts.vision_precision)
        g.save(folder / f"{name}.onnx")
        return g
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staging = folder / f".{name}-fp32"
    staging.mkdir()
    g = GraphBuilder(name, staging / f"{name}.onnx.data")
    build(g, "fp32")
    g.save(staging / f"{name}.onnx")
    quantize_dynamic(staging / f"{name}.onnx", folder / f"{name}.onnx", weight_type=QuantType.QInt8,
                     per_channel=True, reduce_range=True, use_external_data_format=True, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})
    shutil.rmtree(staging)
    for f in (folder / f"{name}.onnx", folder / f"{name}.onnx.data"):
        f.chmod(0o644)
    return g


def _write_embeddings(ckpt: Checkpoint, path: Path) -> dict:
    """Store embed_tokens exactly as the checkpoint holds it (BF16 as its raw 16-bit patterns), copied
    without a float32 detour: the real table is 1.1 GB in bf16 and would be 2.2 GB more in float32."""
    key = "llm.model.embed_tokens.weight"
    table = ckpt.read_raw(key)
    dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[ckpt.dtype(key)]
    np.save(path, table)
    return {"file": path.name, "dtype": dtype, "shape": list(table.shape)}


def _write_tokenizer(ckpt: Checkpoint, folder: Path) -> dict:
    src = ckpt.folder / "tokenizer.json"
    if not src.is_file():
        raise ExportError(f"{ckpt.folder}: no tokenizer.json (the runtime needs the fast tokenizer file)")
    shutil.copyfile(src, folder / "tokenizer.json")
    tok = Tokenizer.from_file(str(src))
    tcfg_path = ckpt.folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    template = tcfg.get("chat_template")
    if not isinstance(template, str):
        raise ExportError(f"{tcfg_path}: no chat_template string")
    (folder / "chat_template.jinja").write_text(template, encoding="utf-8")
    (folder / "chat_template_tts.jinja").write_text(TTS_CHAT_TEMPLATE, encoding="utf-8")
    ids = {}
    for text in [*SPECIAL_TOKENS.values(), *STOP_TOKENS]:
        tid = tok.token_to_id(text)
        if tid is None:
            raise ExportError(f"tokenizer.json has no token {text!r}, which MiniCPM-o prompts need")
        ids[text] = tid
    return {
        "file": "tokenizer.json", "chat_template": "chat_template.jinja",
        "tts_chat_template": "chat_template_tts.jinja",
        "special_tokens": dict(SPECIAL_TOKENS), "token_ids": ids,
        "stop_token_ids": [ids[t] for t in STOP_TOKENS],
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
    }


def _graph_io(g: GraphBuilder) -> dict:
    return _io_of(g.inputs, g.outputs)


def _io_of(inputs, outputs) -> dict:
    def describe(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "elem_type": v.type.tensor_type.elem_type, "shape": dims}
    return {"inputs": [describe(v) for v in inputs], "outputs": [describe(v) for v in outputs]}


def _manifest(ckpt, name, opts, graphs, embed, tokenizer, quant_errors) -> dict:
    cfg = ckpt.config
    d = cfg.decoder
    errs = list(quant_errors.values())
    return {
        "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": ckpt.identity(),
        "options": {"precision": opts.precision, "lm_head_precision": opts.head_precision,
                    "vision_precision": opts.vision_precision, "block_size": opts.block_size,
                    "accuracy_level": opts.accuracy_level, "decoder_dtype": opts.decoder_dtype,
                    "kv_cache": opts.kv_cache,
                    "tensor_precision": [list(t) for t in opts.tensor_precision],
                    "tensor_accuracy": [list(t) for t in opts.tensor_accuracy], "tts_precision": opts.tts_precision,
                    "imatrix": _imatrix_summary(opts)},
        "decoder": {"file": "decoder.onnx", **_graph_io(graphs["decoder"]),
                    "io": {k: getattr(DECODER_IO, k) for k in DECODER_IO.__dataclass_fields__},
                    "num_layers": d.num_hidden_layers, "num_attention_heads": d.num_attention_heads,
                    "num_kv_heads": d.num_key_value_heads, "head_dim": d.head_dim, "hidden_size": d.hidden_size,
                    "vocab_size": d.vocab_size, "max_position_embeddings": d.max_position_embeddings,
                    "kv_dtype": compute_dtype(opts).name,
                    "resident_initializers": graphs["decoder"].resident},
        "vision": {"file": "vision.onnx", **_graph_io(graphs["vision"]), "input_names": list(VISION_INPUTS),
                   "output_name": VISION_OUTPUT, "batch_size": int(cfg.raw.get("vision_batch_size", 16))},
        "embeddings": embed,
        "preprocessing": preprocessing_constants(cfg),
        "tokenizer": tokenizer,
        "quantization": {"relative_error_max": max(errs) if errs else 0.0,
                         "relative_error_mean": float(np.mean(errs)) if errs else 0.0,
                         "per_tensor": {k: round(e, 6) for k, e in quant_errors.items()}},
    }


def _imatrix_summary(opts: ExportOptions) -> dict | None:
    if opts.imatrix_text is None:
        return None
    import hashlib

    data = Path(opts.imatrix_text).read_bytes()
    return {"text": Path(opts.imatrix_text).name, "sha256": hashlib.sha256(data).hexdigest()[:16]}


def preprocessing_constants(cfg) -> dict:
    """The manifest's preprocessing section: what the runtime's image slicing needs."""
    s, v = cfg.slicing, cfg.vision
    return {"max_slice_nums": s.max_slice_nums, "scale_resolution": s.scale_resolution,
            "patch_size": s.patch_size, "query_num": s.query_num, "slice_mode": s.slice_mode,
            "use_image_id": s.use_image_id, "norm_mean": [0.5] * 3, "norm_std": [0.5] * 3,
            "num_patches_per_side": v.num_patches_per_side}


def _log_progress(stage: str, done: int, total: int, unit: str = "") -> None:
    log.info("%s %d/%d %s", stage, done, total, unit)
