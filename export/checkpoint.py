"""Read a MiniCPM-o 2.6 checkpoint (upstream safetensors layout) one tensor at a time, and check it.

A checkpoint is a snapshot folder: config.json, tokenizer files, and either one `model.safetensors`
or shards listed by `model.safetensors.index.json`. Headers are parsed here (8-byte little-endian
length + JSON) rather than through the safetensors library, so that a broken file yields an error
naming the file and the problem, and so that reading needs only numpy. Any tool's layout is
accepted: BF16/F16/F32, any sharding or tensor order, extra metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hf_config import MiniCPMOConfig, load_config
from .tts_config import TTSConfig, parse_tts_config
from .tts_tensors import dvae_sizes, tts_tensors


class CheckpointError(ValueError):
    """The checkpoint is missing, broken, or does not match what config.json describes."""


INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt")
# *.json covers the tokenizer and config files (assets/chattts_tokenizer/ too); Vocos.pt is the vocoder
HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "assets/Vocos.pt"]
PARTS = ("vision", "resampler", "decoder", "audio", "tts")
TTS_PREFIX = "tts."  # checked only when the speech part is requested; skipped whatever they hold otherwise
AUDIO_PREFIXES = ("apm.", "audio_projection_layer.")  # checked only when the audio part is requested
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_NUMPY_DTYPES = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}  # the dtypes read() converts to float32
_MAX_HEADER = 100_000_000
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: Shape
    start: int  # absolute byte offsets in the file
    end: int


# ---------------------------------------------------------------- expected names and shapes

def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, Shape]:
    t = {f"{prefix}.weight": (out, inp)}
    if bias:
        t[f"{prefix}.bias"] = (out,)
    return t


def _norm(prefix: str, dim: int, bias: bool = True) -> dict[str, Shape]:
    return {f"{prefix}.weight": (dim,), **({f"{prefix}.bias": (dim,)} if bias else {})}


def _decoder_tensors(cfg: MiniCPMOConfig) -> dict[str, Shape]:
    d = cfg.decoder
    h, kv, inter = d.hidden_size, d.num_key_value_heads * d.head_dim, d.intermediate_size
    t: dict[str, Shape] = {"llm.model.embed_tokens.weight": (d.vocab_size, h)}
    for i in range(d.num_hidden_layers):
        p = f"llm.model.layers.{i}"
        t |= _linear(f"{p}.self_attn.q_proj", h, h) | _linear(f"{p}.self_attn.k_proj", kv, h)
        t |= _linear(f"{p}.self_attn.v_proj", kv, h) | _linear(f"{p}.self_attn.o_proj", h, h, bias=False)
        t |= _linear(f"{p}.mlp.gate_proj", inter, h, bias=False) | _linear(f"{p}.mlp.up_proj", inter, h, bias=False)
        t |= _linear(f"{p}.mlp.down_proj", h, inter, bias=False)
        t |= _norm(f"{p}.input_layernorm", h, bias=False) | _norm(f"{p}.post_attention_layernorm", h, bias=False)
    t["llm.model.norm.weight"] = (h,)
    if not d.tie_word_embeddings:
        t["llm.lm_head.weight"] = (d.vocab_size, h)
    return t


def _vision_tensors(cfg: MiniCPMOConfig) -> dict[str, Shape]:
    v = cfg.vision
    h, p = v.hidden_size, v.patch_size
    t: dict[str, Shape] = {"vpm.embeddings.patch_embedding.weight": (h, v.num_channels, p, p),
                           "vpm.embeddings.patch_embedding.bias": (h,),
                           "vpm.embeddings.position_embedding.weight": (v.num_patches_per_side ** 2, h)}
    for i in range(cfg.vision_layers_used):  # drop_vision_last_layer removes the last layer upstream
        p_ = f"vpm.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t |= _linear(f"{p_}.self_attn.{proj}", h, h)
        t |= _norm(f"{p_}.layer_norm1", h)
        t |= _linear(f"{p_}.mlp.fc1", v.intermediate_size, h) | _linear(f"{p_}.mlp.fc2", h, v.intermediate_size)
        t |= _norm(f"{p_}.layer_norm2", h)
    return t | _norm("vpm.post_layernorm", h)


def _resampler_tensors(cfg: MiniCPMOConfig) -> dict[str, Shape]:
    d, kv = cfg.decoder.hidden_size, cfg.vision.hidden_size
    t: dict[str, Shape] = {"resampler.query": (cfg.slicing.query_num, d), "resampler.proj": (d, d),
                           "resampler.kv_proj.weight": (d, kv), "resampler.attn.in_proj_weight": (3 * d, d),
                           "resampler.attn.in_proj_bias": (3 * d,)}
    t |= _linear("resampler.attn.out_proj", d, d)
    return t | _norm("resampler.ln_q", d) | _norm("resampler.ln_kv", d) | _norm("resampler.ln_post", d)


def _audio_tensors(cfg: MiniCPMOConfig) -> dict[str, Shape]:
    a = cfg.audio
    if a is None:
        raise CheckpointError("the audio part was requested but config.json has no audio_config")
    d, ffn, h = a.d_model, a.encoder_ffn_dim, cfg.decoder.hidden_size
    if ffn // 4 != d:  # upstream: MultiModalProjector(in_dim=encoder_ffn_dim // 4) eats d_model-wide features
        raise CheckpointError(f"config.json audio_config: encoder_ffn_dim // 4 = {ffn // 4} must equal d_model "
                              f"{d} (the audio projector's input width)")
    t: dict[str, Shape] = {"apm.conv1.weight": (d, a.num_mel_bins, 3), "apm.conv1.bias": (d,),
                           "apm.conv2.weight": (d, d, 3), "apm.conv2.bias": (d,),
                           "apm.embed_positions.weight": (a.max_source_positions, d)}
    for i in range(a.encoder_layers):
        p = f"apm.layers.{i}"
        t |= _linear(f"{p}.self_attn.k_proj", d, d, bias=False)  # Whisper's k_proj has no bias
        t |= _linear(f"{p}.self_attn.v_proj", d, d) | _linear(f"{p}.self_attn.q_proj", d, d)
        t |= _linear(f"{p}.self_attn.out_proj", d, d) | _norm(f"{p}.self_attn_layer_norm", d)
        t |= _linear(f"{p}.fc1", ffn, d) | _linear(f"{p}.fc2", d, ffn) | _norm(f"{p}.final_layer_norm", d)
    t |= _norm("apm.layer_norm", d)
    return t | _linear("audio_projection_layer.linear1", h, ffn // 4) | _linear("audio_projection_layer.linear2", h, h)


_PART_TABLES = {"decoder": _decoder_tensors, "vision": _vision_tensors,  # in upstream order
                "resampler": _resampler_tensors, "audio": _audio_tensors}


def expected_tensors(config: MiniCPMOConfig, parts=PARTS) -> dict[str, Shape]:
    """Every tensor name -> shape that the given parts need, in upstream order (llm, vpm, resampler, apm)."""
    unknown = sorted(set(parts) - set(PARTS))
    parts = tuple(p for p in parts if p != "tts")  # the speech table needs the stored shapes: Checkpoint.tts_tensors
    if unknown:
        raise CheckpointError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    return {k: v for part in _PART_TABLES if part in parts for k, v in _PART_TABLES[part](config).items()}


# ---------------------------------------------------------------- safetensors headers

def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors header and check it against the file size; raise CheckpointError."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated: {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path.name}: header length {n} is implausible (not a safetensors file?)")
        if n > size - 8:
            raise CheckpointError(f"{path.name}: truncated: header says {n} bytes of header, file has {size - 8}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)  # free-form strings; nothing here depends on them
    entries = {name: _entry(path, name, e, 8 + n) for name, e in header.items()}
    data = max((e.end for e in entries.values()), default=8 + n) - 8 - n
    if data > size - 8 - n:
        raise CheckpointError(f"{path.name}: truncated: header says {data} bytes of data, file has {size - 8 - n}")
    return entries


def _entry(path: Path, name: str, e, data_start: int) -> TensorInfo:
    where = f"{path.name}: tensor '{name}'"
    if not isinstance(e, dict) or not isinstance(e.get("dtype"), str):
        raise CheckpointError(f"{where}: header entry has no dtype")
    shape, offsets = e.get("shape"), e.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
    dtype = e["dtype"]
    if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} bytes of data, but {dtype} {shape} "
                              f"needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
    return TensorInfo(path, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _shard_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """The safetensors files to read, and the index's weight_map ({} without an index)."""
    index = folder / INDEX_FILE
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported)" if any(folder.glob("*.bin")) else ""
            raise CheckpointError(f"{folder}: no *.safetensors files{hint}")
        return files, {}
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{INDEX_FILE}: not a valid index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{INDEX_FILE}: weight_map must map tensor names to file names")
    files: list[Path] = []
    for name, file in weight_map.items():
        path = folder / file
        if path not in files:
            if not path.is_file():
                raise CheckpointError(f"{INDEX_FILE}: weight_map points to missing file '{file}' "
                                      f"(for tensor '{name}')")
            files.append(path)
    return sorted(files), weight_map


# ---------------------------------------------------------------- the checkpoint

class Checkpoint:
    """A snapshot folder: typed config plus lazy, one-tensor-at-a-time access to its weights."""

    def __init__(self, folder: str | Path, hub_id: str | None = None, revision: str | None = None):
        self.folder = Path(folder)
        self.config = load_config(self.folder)
        self.hub_id, self.revision = hub_id, revision
        # A hub cache folder (.../models--owner--name/snapshots/<commit>) tells its origin.
        m = re.search(r"models--([^/]+)--([^/]+)/snapshots/([0-9a-f]{40})$", self.folder.resolve().as_posix())
        if m:
            self.hub_id, self.revision = hub_id or f"{m[1]}/{m[2]}", revision or m[3]
        self._files, weight_map = _shard_files(self.folder)
        self._tensors = self._scan(weight_map)

    def _scan(self, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for path in self._files:
            for name, info in read_header(path).items():
                if name in tensors:
                    raise CheckpointError(f"tensor '{name}' is in both {tensors[name].file.name} and {path.name}")
                tensors[name] = info
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file.name != Path(file).name:
                raise CheckpointError(f"{INDEX_FILE} maps tensor '{name}' to {file}, which has no such tensor")
        return tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"missing tensor '{name}'") from None

    def shape(self, name: str) -> Shape:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (BF16, F16, F32, ...)."""
        return self.info(name).dtype

    def read_raw(self, name: str) -> np.ndarray:
        """One tensor in its stored form: uint16 bit patterns for BF16, else float16/float32."""
        info = self.info(name)
        _check_dtype(name, info.dtype)
        count = math.prod(info.shape)
        with open(info.file, "rb") as f:
            raw = np.fromfile(f, dtype=_NUMPY_DTYPES[info.dtype], count=count, offset=info.start)
        if raw.size != count:
            raise CheckpointError(f"{info.file.name}: truncated while reading tensor '{name}'")
        return raw.reshape(info.shape)

    def read(self, name: str) -> np.ndarray:
        """One tensor as float32 (exact for BF16/F16/F32), read straight from its file region."""
        raw = self.read_raw(name)
        if self.info(name).dtype == "BF16":  # bf16 is the upper half of a float32
            return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32)
        return raw.astype(np.float32)

    def tts_config(self) -> TTSConfig:
        """config.json's tts_config (upstream defaults; llm_dim = the LLM's width when it is absent)."""
        raw = self.config.raw.get("tts_config")
        return parse_tts_config(raw if raw is not None else {"llm_dim": self.config.decoder.hidden_size})

    def has_tts(self) -> bool:
        return any(k.startswith(TTS_PREFIX) for k in self._tensors)

    def tts_tensors(self) -> dict[str, Shape]:
        """The tts.* names and shapes this checkpoint must hold: the TTS Llama's from tts_config, the
        DVAE's from its stored widths (upstream hard-codes them)."""
        layers = sum(1 for k in self._tensors if k.startswith("tts.dvae.decoder.decoder_block.") and k.endswith(".coef"))
        return tts_tensors(self.tts_config(), dvae_sizes(self.shape, layers))

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).is_file()]

    def identity(self) -> dict:
        """JSON-ready facts that identify the source weights (for a bundle's manifest)."""
        index = self.folder / INDEX_FILE
        dtypes = sorted({i.dtype for i in self._tensors.values()})
        return {"folder": self.folder.resolve().name, "hub_id": self.hub_id, "revision": self.revision,
                "config_sha256": _sha256(self.folder / "config.json"),
                "index_sha256": _sha256(index) if index.is_file() else None,
                "files": [p.name for p in self._files], "num_tensors": len(self._tensors),
                "tensor_bytes": sum(i.end - i.start for i in self._tensors.values()), "dtypes": dtypes}

    def validate(self, parts=PARTS) -> None:
        """Check every tensor the given parts need (name, shape, dtype) and that the files are whole;
        raise CheckpointError naming the first problem. `tts.*` matters only when "tts" is in parts,
        `apm.*` and `audio_projection_layer.*` only when "audio" is; any other unknown key is an error."""
        for path in self._files:  # files may have changed since opening
            if not path.is_file():
                raise CheckpointError(f"{path.name}: missing")
            read_header(path)
        want = expected_tensors(self.config, parts)
        if "tts" in parts:
            want |= self.tts_tensors()
        for name, shape in want.items():
            info = self.info(name)
            _check_dtype(name, info.dtype)
            if info.shape != shape:
                raise CheckpointError(f"tensor '{name}' has shape {list(info.shape)}, expected {list(shape)}")
        known = set(want) | set(expected_tensors(self.config, ("vision", "resampler", "decoder")))
        if self.config.decoder.tie_word_embeddings:
            known.add("llm.lm_head.weight")  # tied: usually dropped on save, harmless if kept
        skipped = (() if "tts" in parts else (TTS_PREFIX,)) + (() if "audio" in parts else AUDIO_PREFIXES)
        if self.config.drop_vision_last_layer:  # unused upstream, but a full-model save may still hold it
            skipped += (f"vpm.encoder.layers.{self.config.vision.num_hidden_layers - 1}.",)
        for name, info in self._tensors.items():
            if not name.startswith(skipped) and name not in known:
                raise CheckpointError(f"unexpected tensor '{name}' in {info.file.name}")


def _check_dtype(name: str, dtype: str) -> None:
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"tensor '{name}' has unknown dtype '{dtype}'")
    if dtype not in _NUMPY_DTYPES:
        raise CheckpointError(f"tensor '{name}' has dtype {dtype}; supported: {', '.join(_NUMPY_DTYPES)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- opening

def open_checkpoint(source: str | Path) -> Checkpoint:
    """Open a local snapshot folder, or download a hub id ("owner/name" or "owner/name@revision")
    with only the config, tokenizer and safetensors files."""
    path = Path(source).expanduser()
    if path.is_dir():
        return Checkpoint(path)
    if path.exists():
        raise CheckpointError(f"{path}: not a folder (give the checkpoint's snapshot folder)")
    repo, _, revision = str(source).partition("@")
    if not _HUB_ID.fullmatch(repo):
        raise CheckpointError(f"{source}: no such folder, and not a hub id like 'openbmb/MiniCPM-o-2_6'")
    return Checkpoint(_download(repo, revision or None), hub_id=repo)


def _download(repo: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise CheckpointError(f"'{repo}' is not a local folder, and downloading it needs huggingface_hub "
                              "(pip install 'minicpmo-onnx[export]')") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError, HfHubHTTPError) as e:
        raise CheckpointError(f"'{repo}' is not a local folder, and downloading it from the Hugging Face Hub "
                              f"failed (offline? set HF_HUB_OFFLINE=1 to use the cache only): "
                              f"{type(e).__name__}: {e}") from None
