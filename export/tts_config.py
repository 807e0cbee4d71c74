"""config.json's `tts_config` as a frozen dataclass, with upstream's defaults.

The real config.json sets only `model_type` and `llm_dim`; every other field takes the default of
upstream's `ConditionalChatTTSConfig` (and the TTS Llama those of transformers' `LlamaConfig`, which
upstream builds with only the sizes: rms_norm_eps 1e-6, rope_theta 10000, no attention bias).
Synthetic tiny checkpoints write smaller sizes here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .hf_config import ConfigError

WHERE = "config.json tts_config"


@dataclass(frozen=True)
class TTSConfig:
    llm_dim: int = 2560  # upstream's default; the real config sets 3584
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 20
    max_position_embeddings: int = 4096
    num_audio_tokens: int = 626
    num_text_tokens: int = 21178
    num_mel_bins: int = 100
    num_vq: int = 4
    use_speaker_embedding: bool = True
    spk_emb_token_id: int = 21143
    num_spk_embs: int = 1
    audio_bos_token_id: int = 21132
    text_eos_token_id: int = 21133
    streaming_text_chunk_size: int = 10
    streaming_text_reserved_len: int = 300
    streaming_audio_chunk_size: int = 50
    use_mlp: bool = True
    top_p: float = 0.7
    top_k: int = 20
    repetition_penalty: float = 1.0
    rms_norm_eps: float = 1e-6  # LlamaConfig defaults (not in ConditionalChatTTSConfig)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def condition_length(self) -> int:
        """[Stts] + [spk_emb]s + the reserved text + [Ptts] (upstream `condition_length`)."""
        return 1 + self.num_spk_embs * self.use_speaker_embedding + self.streaming_text_reserved_len + 1


def parse_tts_config(raw: dict[str, Any] | None) -> TTSConfig | None:
    """The typed tts_config, or None when config.json has none. Raises ConfigError naming a bad field."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{WHERE}: expected an object")
    values = {}
    for f in fields(TTSConfig):
        if f.name not in raw:
            continue
        value, typ = raw[f.name], type(f.default)
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{WHERE}: field '{f.name}' should be {typ.__name__}, got {value!r}")
        values[f.name] = value
    cfg = TTSConfig(**values)
    for name in ("llm_dim", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "num_audio_tokens", "num_text_tokens", "num_vq", "streaming_text_reserved_len"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{WHERE}: field '{name}' must be positive, got {getattr(cfg, name)}")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 2:
        raise ConfigError(f"{WHERE}: hidden_size must split into num_attention_heads heads of even size")
    if not cfg.use_mlp or not cfg.use_speaker_embedding:
        raise ConfigError(f"{WHERE}: only use_mlp and use_speaker_embedding true are supported (as upstream ships)")
    return cfg
