"""Synthetic MiniCPM-o 2.6 checkpoints in the exact upstream format, with seeded random weights.

Sizes: "full" has the real names and shapes (1,599 tensors, 8.67e9 parameters, ~17 GB in BF16,
four 5 GB shards); "small" keeps the real vision, audio and TTS shapes around a Qwen2.5-1.5B-shaped
LLM; "tiny" is for tests. The tensor table comes from checkpoint.expected_tensors (plus the
speech tensors of export/synth_tts.py), so the writer and the reader cannot drift apart.

Weights are drawn per tensor from a generator seeded by (seed, sha256(name)): the bytes of a tensor
do not depend on which other tensors are written or in what order. Scales keep a forward pass sane:
linear weights N(0, 1/fan_in) (halved where a layer writes into a residual stream), norm weights
1 + small noise, small biases, unit-scale embeddings, and an lm_head scaled so the logits spread out
instead of tying.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .checkpoint import INDEX_FILE, TOKENIZER_FILES, CheckpointError, Shape, expected_tensors
from .hf_config import parse_config
from .staging import staged_folder
from .synth_tokenizer import build_tokenizer, make_tokenizer
from .synth_tts import (
    DVAE_TINY,
    VOCOS_FILE,
    VOCOS_TINY,
    tts_config,
    tts_init_scale,
    write_chattts_tokenizer,
    write_vocos,
)
from .tts_config import parse_tts_config
from .tts_tensors import DVAESizes, VocosSizes, tts_tensors

log = logging.getLogger(__name__)
Progress = Callable[[int, int, str], None]  # (done_bytes, total_bytes, message)

ASSET = Path(__file__).parent / "assets" / "upstream_config.json"
SIZES = ("tiny", "small", "full")
REAL_VOCAB = 151700
SHARD_BYTES = {"tiny": None, "small": 2_000_000_000, "full": 5_000_000_000}  # None: one model.safetensors
CHUNK = 1 << 22  # elements generated at a time: bounds memory whatever the tensor size
LOGIT_STD = 3.0  # std of random logits; wider than 1 so greedy decoding has clear winners
BIAS_STD, NORM_NOISE, POSITION_STD = 0.02, 0.05, 0.5
# Layers that write into a residual stream start smaller (as in GPT-2's init), so the stream grows
# slowly with depth and the token embedding stays a visible part of it.
RESIDUAL_SCALE = 0.5
_RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "self_attn.out_proj.weight", "down_proj.weight", "fc2.weight")

_LLM = {  # top-level (Qwen2) fields per size; "full" keeps the real ones
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_window_layers": 2},
    "small": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,  # Qwen2.5-1.5B
              "num_attention_heads": 12, "num_key_value_heads": 2, "max_window_layers": 28},
}
_VISION_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
_AUDIO_TINY = {"d_model": 64, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 256,
               "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 256, "num_hidden_layers": 2,
               "num_mel_bins": 80, "max_source_positions": 1500}  # ffn // 4 == d_model, as upstream


@lru_cache(maxsize=1)
def upstream_metadata() -> dict:
    """The real config.json, preprocessor_config.json and generation_config.json, from the bundled asset."""
    return json.loads(ASSET.read_text(encoding="utf-8"))


def synthetic_config(size: str, vocab_size: int, bos_token_id: int | None = None,
                     eos_token_id: int | None = None) -> dict:
    """config.json for a size: the upstream fields with the dimensions of that size."""
    _check_size(size)
    cfg = copy.deepcopy(upstream_metadata()["config"])
    cfg["_name_or_path"] = f"synthetic/MiniCPM-o-2_6-{size}"
    cfg.update(_LLM.get(size, {}), vocab_size=vocab_size)
    cfg["tts_config"] = tts_config(size, cfg["hidden_size"])
    if bos_token_id is not None:
        cfg["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    if size == "tiny":
        cfg["vision_config"].update(_VISION_TINY)
        cfg["audio_config"].update(_AUDIO_TINY)
    return cfg


def planned_tensors(size: str, audio: bool = True, vocab_size: int | None = None,
                    tts: bool = True) -> list[tuple[str, Shape]]:
    """(name, shape) of every tensor a synthetic checkpoint of this size holds, in upstream order.
    vocab_size defaults to 151700 for "full" and to the synthetic tokenizer's size otherwise."""
    if vocab_size is None:
        vocab_size = REAL_VOCAB if size == "full" else make_tokenizer()[0].get_vocab_size(with_added_tokens=True)
    raw = synthetic_config(size, vocab_size)
    cfg = parse_config(raw)
    parts = ("decoder", "vision", "resampler") + (("audio",) if audio else ())
    speech = tts_tensors(parse_tts_config(raw["tts_config"]), speech_sizes(size)[0]) if tts else {}
    return list((expected_tensors(cfg, parts) | speech).items())


def speech_sizes(size: str) -> tuple[DVAESizes, VocosSizes]:
    """The DVAE and Vocos widths of a size: shrunk for tiny, the real ones otherwise."""
    return (DVAE_TINY, VOCOS_TINY) if size == "tiny" else (DVAESizes(), VocosSizes())


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")


# ---------------------------------------------------------------- writing

def write_synthetic_checkpoint(out_dir: str | Path, size: str = "tiny", seed: int = 0, audio: bool = True,
                               tokenizer_dir: str | Path | None = None, progress: Progress | None = None,
                               max_shard_bytes: int | None = None, tts: bool = True) -> Path:
    """Write a random-weight checkpoint folder laid out like the `openbmb/MiniCPM-o-2_6` snapshot.

    Args:
        out_dir: the folder to create (must not exist, or be empty).
        size: "tiny" (tests), "small" (Qwen2.5-1.5B-shaped LLM) or "full" (the real shapes).
        seed: same seed, same bytes.
        audio: False leaves out apm.* and audio_projection_layer.* (tts.* stays, as upstream).
        tts: False leaves out tts.*, assets/chattts_tokenizer/ and assets/Vocos.pt.
        tokenizer_dir: copy this tokenizer (e.g. the real one) instead of building a small BPE.
        progress: called as progress(done_bytes, total_bytes, message); logs to stderr when None.
        max_shard_bytes: shard size (default: one file for tiny, 2 GB for small, 5 GB for full).

    Returns:
        out_dir as a Path.
    """
    _check_size(size)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new folder")
    with staged_folder(out) as tmp:
        _write_all(tmp, size, seed, audio, tokenizer_dir, progress or _LogProgress(),
                   max_shard_bytes or SHARD_BYTES[size], tts)
    return out


def _write_all(folder: Path, size: str, seed: int, audio: bool, tokenizer_dir, progress: Progress,
               max_shard_bytes: int | None, tts: bool = True) -> None:
    vocab, bos, eos = _write_tokenizer(folder, tokenizer_dir)
    if size == "full":  # the real embedding shape, whatever tokenizer rides along
        if vocab > REAL_VOCAB:
            raise CheckpointError(f"tokenizer has {vocab} tokens, more than the real vocab_size {REAL_VOCAB}")
        vocab = REAL_VOCAB
    meta = upstream_metadata()
    _write_json(folder / "config.json", synthetic_config(size, vocab, bos, eos))
    gen = {**meta["generation_config"], "bos_token_id": bos, "eos_token_id": eos}
    _write_json(folder / "generation_config.json", dict(sorted(gen.items())))  # as transformers writes it
    _write_json(folder / "preprocessor_config.json", meta["preprocessor_config"])
    tensors = planned_tensors(size, audio, vocab, tts)
    if tts:
        write_chattts_tokenizer(folder)
        write_vocos(folder / VOCOS_FILE, speech_sizes(size)[1], seed)
    total = sum(2 * math.prod(s) for _, s in tensors)
    free = shutil.disk_usage(folder).free
    if free < total:
        raise CheckpointError(f"{folder.parent}: {free / 1e9:.1f} GB free, the weights need {total / 1e9:.1f} GB")
    shards = _plan_shards(tensors, max_shard_bytes)
    done = 0
    for file, group in shards:
        done = _write_safetensors(folder / file, group, seed, done, total, progress)
    if len(shards) > 1:
        weight_map = {name: file for file, group in shards for name, _ in group}
        _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total},
                                          "weight_map": dict(sorted(weight_map.items()))})
    progress(total, total, "done")


def _write_tokenizer(folder: Path, tokenizer_dir) -> tuple[int, int | None, int | None]:
    """Copy or build the tokenizer files; return (vocab size, id of <|endoftext|>, id of <|im_end|>)."""
    if tokenizer_dir is None:
        build_tokenizer(folder)
    else:
        src = Path(tokenizer_dir)
        if not (src / "tokenizer.json").is_file():
            raise CheckpointError(f"{src}: no tokenizer.json")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, folder / name)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return (tok.get_vocab_size(with_added_tokens=True), tok.token_to_id("<|endoftext|>"),
            tok.token_to_id("<|im_end|>"))


def _plan_shards(tensors: list[tuple[str, Shape]], max_bytes: int | None) -> list[tuple[str, list]]:
    """Split in order like transformers' save_pretrained: a new shard when the next tensor would overflow."""
    if max_bytes is None:
        return [("model.safetensors", tensors)]
    groups: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    if len(groups) == 1:
        return [("model.safetensors", tensors)]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", g) for i, g in enumerate(groups)]


def _write_safetensors(path: Path, tensors: list[tuple[str, Shape]], seed: int, done: int, total: int,
                       progress: Progress) -> int:
    """Stream one BF16 safetensors file tensor by tensor, chunk by chunk; return the new done_bytes.

    Written by hand because safetensors' save_file needs the whole shard in memory (5 GB for full)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so the data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors:
            for chunk in random_bf16(name, shape, seed):
                f.write(chunk.data)
                done += chunk.nbytes
                progress(done, total, path.name)
    return done


def random_bf16(name: str, shape: Shape, seed: int) -> Iterator[np.ndarray]:
    """The tensor's values as little-endian bf16 bits (uint16), in chunks of at most CHUNK elements."""
    mean, std = init_scale(name, shape)
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
    left = math.prod(shape)
    while left:
        x = rng.standard_normal(min(left, CHUNK), dtype=np.float32)
        x *= std
        x += mean
        left -= x.size
        yield to_bf16_bits(x)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns with round-to-nearest-even (finite inputs); overwrites x."""
    bits = x.view(np.uint32)
    lsb = (bits >> 16) & 1
    bits += 0x7FFF
    bits += lsb
    bits >>= 16
    return bits.astype("<u2")


def init_scale(name: str, shape: Shape) -> tuple[float, float]:
    """(mean, std) of the random values for a tensor, chosen from its name and shape."""
    special = tts_init_scale(name, shape) if name.startswith("tts.") else None
    if special is not None:
        return special
    if len(shape) == 1:  # every 1-D ".weight" here is a norm scale; the rest are biases/coefficients
        return (1.0, NORM_NOISE) if name.endswith(".weight") else (0.0, BIAS_STD)
    if "position" in name:
        return 0.0, POSITION_STD
    if name.endswith("embed_tokens.weight") or ".emb_" in name or name == "resampler.query":
        return 0.0, 1.0
    if name == "llm.lm_head.weight":  # the final norm makes inputs unit-scale: logits ~ N(0, LOGIT_STD)
        return 0.0, LOGIT_STD / math.sqrt(shape[1])
    if name == "resampler.proj":  # used as x @ proj: the fan-in is the first axis
        return 0.0, 1.0 / math.sqrt(shape[0])
    scale = RESIDUAL_SCALE if name.endswith(_RESIDUAL_OUTPUTS) else 1.0
    return 0.0, scale / math.sqrt(math.prod(shape[1:]))


class _LogProgress:
    """Default progress: a log line per file and every 5%."""

    def __init__(self):
        self.file, self.step = None, -1

    def __call__(self, done: int, total: int, message: str) -> None:
        step = 20 * done // max(total, 1)
        if message != self.file or step != self.step:
            self.file, self.step = message, step
            level = logging.INFO if total >= 1e9 else logging.DEBUG  # tiny checkpoints stay quiet
            log.log(level, "%s: %.2f / %.2f GB (%d%%)", message, done / 1e9, total / 1e9, 100 * step // 20)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
