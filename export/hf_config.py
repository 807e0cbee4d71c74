"""MiniCPM-o 2.6 `config.json` as frozen dataclasses, read once.

Field names follow the Hugging Face config (and the upstream defaults where the real config.json
omits a field: SiglipVisionConfig, WhisperConfig, MiniCPMVSliceConfig).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """config.json is missing a field or holds a value this exporter cannot use."""


@dataclass(frozen=True)
class DecoderConfig:  # Qwen2 fields at the top level of config.json
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:  # config["vision_config"], SiglipVisionConfig defaults
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int
    layer_norm_eps: float
    num_channels: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class AudioConfig:  # config["audio_config"], WhisperConfig defaults
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    num_mel_bins: int
    max_source_positions: int


@dataclass(frozen=True)
class SliceConfig:  # preprocessing knobs (config.json + MiniCPMVSliceConfig defaults)
    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    query_num: int
    slice_mode: bool
    use_image_id: bool


@dataclass(frozen=True)
class MiniCPMOConfig:
    decoder: DecoderConfig
    vision: VisionConfig
    audio: AudioConfig | None
    slicing: SliceConfig
    drop_vision_last_layer: bool
    audio_pool_step: int
    audio_chunk_length: float
    chunk_input: bool
    version: float
    raw: dict[str, Any]

    @property
    def resampler_heads(self) -> int:
        return self.decoder.hidden_size // 128

    @property
    def vision_layers_used(self) -> int:
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n


def _get(d: dict, key: str, typ, default=None, where="config.json"):
    if key not in d:
        if default is None:
            raise ConfigError(f"{where}: missing field '{key}'")
        return default
    value = d[key]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"{where}: field '{key}' should be {typ.__name__}, got {value!r}")
    return value


def _positive(where: str, **fields: int) -> None:
    for name, value in fields.items():
        if value <= 0:
            raise ConfigError(f"{where}: field '{name}' must be positive, got {value}")


def parse_config(raw: dict[str, Any]) -> MiniCPMOConfig:
    """Validate a config.json dict and return the typed config; raise ConfigError naming the field."""
    dec = DecoderConfig(
        hidden_size=_get(raw, "hidden_size", int),
        intermediate_size=_get(raw, "intermediate_size", int),
        num_hidden_layers=_get(raw, "num_hidden_layers", int),
        num_attention_heads=_get(raw, "num_attention_heads", int),
        num_key_value_heads=_get(raw, "num_key_value_heads", int, raw.get("num_attention_heads")),
        vocab_size=_get(raw, "vocab_size", int),
        rms_norm_eps=_get(raw, "rms_norm_eps", float, 1e-6),
        rope_theta=_get(raw, "rope_theta", float, 10000.0),
        max_position_embeddings=_get(raw, "max_position_embeddings", int, 32768),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
    )
    _positive("config.json", hidden_size=dec.hidden_size, intermediate_size=dec.intermediate_size,
              num_hidden_layers=dec.num_hidden_layers, num_attention_heads=dec.num_attention_heads,
              num_key_value_heads=dec.num_key_value_heads, vocab_size=dec.vocab_size)
    if dec.hidden_size % dec.num_attention_heads:
        raise ConfigError("config.json: hidden_size must be divisible by num_attention_heads")
    if dec.num_attention_heads % dec.num_key_value_heads:
        raise ConfigError("config.json: num_attention_heads must be divisible by num_key_value_heads")
    if dec.hidden_size % 128:
        raise ConfigError(f"config.json: hidden_size {dec.hidden_size} must be a multiple of 128 "
                          "(the resampler uses hidden_size/128 heads)")
    if dec.head_dim % 2:
        raise ConfigError("config.json: head_dim (hidden_size/num_attention_heads) must be even for RoPE")
    if raw.get("rope_scaling"):
        raise ConfigError(f"config.json: rope_scaling {raw['rope_scaling']!r} is not supported")

    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise ConfigError("config.json: missing object 'vision_config'")
    vw = "config.json vision_config"
    vis = VisionConfig(
        hidden_size=_get(v, "hidden_size", int, 768, vw),
        intermediate_size=_get(v, "intermediate_size", int, 3072, vw),
        num_hidden_layers=_get(v, "num_hidden_layers", int, 12, vw),
        num_attention_heads=_get(v, "num_attention_heads", int, 12, vw),
        patch_size=_get(v, "patch_size", int, 16, vw),
        image_size=_get(v, "image_size", int, 224, vw),
        layer_norm_eps=_get(v, "layer_norm_eps", float, 1e-6, vw),
        num_channels=_get(v, "num_channels", int, 3, vw),
    )
    _positive(vw, hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
              num_hidden_layers=vis.num_hidden_layers, num_attention_heads=vis.num_attention_heads)
    if vis.hidden_size % vis.num_attention_heads:
        raise ConfigError(f"{vw}: hidden_size must be divisible by num_attention_heads")
    if vis.num_channels != 3:
        raise ConfigError(f"{vw}: num_channels must be 3, got {vis.num_channels}")

    aud = None
    a = raw.get("audio_config")
    if isinstance(a, dict):
        aw = "config.json audio_config"
        aud = AudioConfig(
            d_model=_get(a, "d_model", int, 1024, aw),
            encoder_layers=_get(a, "encoder_layers", int, 24, aw),
            encoder_attention_heads=_get(a, "encoder_attention_heads", int, 16, aw),
            encoder_ffn_dim=_get(a, "encoder_ffn_dim", int, 4096, aw),
            num_mel_bins=_get(a, "num_mel_bins", int, 80, aw),
            max_source_positions=_get(a, "max_source_positions", int, 1500, aw),
        )

    sc = raw.get("slice_config") or {}
    patch = _get(raw, "patch_size", int, 14)
    slicing = SliceConfig(
        max_slice_nums=_get(sc, "max_slice_nums", int, 9, "config.json slice_config"),
        scale_resolution=_get(sc, "scale_resolution", int, 448, "config.json slice_config"),
        patch_size=_get(sc, "patch_size", int, patch, "config.json slice_config"),
        query_num=_get(raw, "query_num", int, 64),
        slice_mode=bool(raw.get("slice_mode", True)),
        use_image_id=bool(raw.get("use_image_id", True)),
    )
    if slicing.patch_size != vis.patch_size:
        raise ConfigError(f"config.json: patch_size {slicing.patch_size} != vision_config.patch_size {vis.patch_size}")
    _positive("config.json", query_num=slicing.query_num, max_slice_nums=slicing.max_slice_nums)

    return MiniCPMOConfig(
        decoder=dec, vision=vis, audio=aud, slicing=slicing,
        drop_vision_last_layer=bool(raw.get("drop_vision_last_layer", False)),
        audio_pool_step=int(raw.get("audio_pool_step", 2)),
        audio_chunk_length=float(raw.get("audio_chunk_length", 1.0)),
        chunk_input=bool(raw.get("chunk_input", True)),
        version=float(raw.get("version", 2.6)),
        raw=raw,
    )


def load_config(folder: str | Path) -> MiniCPMOConfig:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (is this a MiniCPM-o checkpoint folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(raw)
