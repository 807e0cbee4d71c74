"""Reference audio path: Whisper log-mel features and the MiniCPM-o audio encoder.

Follows transformers' WhisperFeatureExtractor torch path (what upstream runs when torch is installed),
upstream MiniCPMWhisperEncoder and MiniCPMO.get_audio_embedding, including its batch semantics: all
pieces of a prompt are zero-padded to the longest one and run as one batch. Eager torch over a plain
weight dict with the upstream names (`apm.*`, `audio_projection_layer.*`). Never used by the runtime.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..hf_config import MiniCPMOConfig

SAMPLE_RATE, N_FFT, HOP, N_MELS, PIECE = 16_000, 400, 160, 80, 480_000
LN_EPS = 1e-5  # nn.LayerNorm default, as WhisperEncoder builds its norms


def slaney_mel_bank(n_mels: int = N_MELS, dtype=torch.float64) -> torch.Tensor:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels, fmax=8000, htk=False, norm="slaney"): [n_mels, 201]."""
    def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
        linear = f / (200.0 / 3)
        log = 15.0 + torch.log(torch.clamp(f, min=1e-10) / 1000.0) / (math.log(6.4) / 27.0)
        return torch.where(f >= 1000.0, log, linear)

    def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m >= 15.0, 1000.0 * torch.exp(math.log(6.4) / 27.0 * (m - 15.0)), m * (200.0 / 3))

    lo, hi = hz_to_mel(torch.tensor([0.0, 8000.0], dtype=torch.float64))
    mel_hz = mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64))
    fft_hz = torch.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1, dtype=torch.float64)
    bank = torch.zeros(n_mels, fft_hz.numel(), dtype=torch.float64)
    for i in range(n_mels):
        left, centre, right = mel_hz[i], mel_hz[i + 1], mel_hz[i + 2]
        rising = (fft_hz - left) / (centre - left)
        falling = (right - fft_hz) / (right - centre)
        bank[i] = torch.clamp(torch.minimum(rising, falling), min=0.0) * (2.0 / (right - left))
    return bank.to(dtype)


def whisper_log_mel(samples: np.ndarray | torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """One piece (<= 30 s) -> [80, ceil(n/160)]: padded to 30 s, torch.stft, floor at the padded max - 8."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32)).to(dtype)
    n = x.numel()
    assert 0 < n <= PIECE, n
    x = F.pad(x, (0, PIECE - n))
    stft = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, dtype=dtype), return_complex=True)
    power = stft[..., :-1].abs() ** 2  # [201, 3000]
    logmel = torch.clamp(slaney_mel_bank(dtype=dtype) @ power, min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.max() - 8.0)
    return ((logmel + 4.0) / 4.0)[:, : math.ceil(n / HOP)]


def audio_pieces(samples: np.ndarray) -> list[np.ndarray]:
    """audio_feature_extract: clips longer than 30 s become consecutive 30 s pieces."""
    if len(samples) <= PIECE:
        return [samples]
    return [samples[i * PIECE:(i + 1) * PIECE] for i in range(math.ceil(len(samples) / PIECE))]


def subsequent_chunk_mask(size: int, chunk_size: int) -> torch.Tensor:
    """Upstream (wenet) mask with num_left_chunks=-1: row i may see columns [0, min((i//c+1)*c, size))."""
    ret = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        ret[i, : min((i // chunk_size + 1) * chunk_size, size)] = True
    return ret


def _linear(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _layer_norm(w: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS)


def _attention(w, name: str, x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    # WhisperAttention: q scaled after its projection, k_proj without bias; mask [B, 1, L, L] additive
    b, length, dim = x.shape
    hd = dim // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, heads, hd).transpose(1, 2)

    q = split(_linear(w, f"{name}.q_proj", x) * hd**-0.5)
    k = split(_linear(w, f"{name}.k_proj", x))
    v = split(_linear(w, f"{name}.v_proj", x))
    probs = F.softmax(q @ k.transpose(2, 3) + mask, dim=-1, dtype=torch.float32)
    return _linear(w, f"{name}.out_proj", (probs @ v).transpose(1, 2).reshape(b, length, dim))


def whisper_encoder(w: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, features: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """MiniCPMWhisperEncoder.forward: features [B, 80, F], mask [B, 1, C, C] -> hidden_states[-1] [B, C, d]."""
    x = F.gelu(F.conv1d(features, w["apm.conv1.weight"], w["apm.conv1.bias"], padding=1))
    x = F.gelu(F.conv1d(x, w["apm.conv2.weight"], w["apm.conv2.bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1)
    x = x + w["apm.embed_positions.weight"][: x.shape[1]]
    for i in range(cfg.audio.encoder_layers):
        name = f"apm.layers.{i}"
        x = x + _attention(w, f"{name}.self_attn", _layer_norm(w, f"{name}.self_attn_layer_norm", x), mask,
                           cfg.audio.encoder_attention_heads)
        h = F.gelu(_linear(w, f"{name}.fc1", _layer_norm(w, f"{name}.final_layer_norm", x)))
        x = x + _linear(w, f"{name}.fc2", h)
    return _layer_norm(w, "apm.layer_norm", x)


def audio_attention_mask(feature_lens: torch.Tensor, max_frames: int, chunk_length: float) -> torch.Tensor:
    """get_audio_embedding's additive mask [B, 1, C, C]. Note upstream compares the post-conv index with
    the MEL frame count (audio_feature_lens), so its "padding" mask hides less than the padding."""
    b = feature_lens.numel()
    c = (max_frames - 1) // 2 + 1
    padded = torch.arange(c)[None, :] >= feature_lens[:, None]  # [B, C]
    hidden = padded.view(b, 1, 1, c).expand(b, 1, c, c)
    if chunk_length > 0:
        hidden = hidden | ~subsequent_chunk_mask(c, int(chunk_length * 50))
    mask = torch.zeros(b, 1, c, c)
    mask[hidden] = float("-inf")
    return mask


def audio_embeddings(w: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, features: Sequence[torch.Tensor],
                     chunk_length: float | None = None) -> list[torch.Tensor]:
    """get_audio_embedding over one batch of pieces [80, F_i] -> per piece [T_i, D] (T_i from F_i)."""
    chunk_length = cfg.audio_chunk_length if chunk_length is None else chunk_length
    lens = torch.tensor([f.shape[-1] for f in features])
    batch = torch.nn.utils.rnn.pad_sequence([f.T for f in features], batch_first=True).permute(0, 2, 1)
    mask = audio_attention_mask(lens, batch.shape[-1], chunk_length)
    states = whisper_encoder(w, cfg, batch.float(), mask)
    x = _linear(w, "audio_projection_layer.linear2", F.relu(_linear(w, "audio_projection_layer.linear1", states)))
    step = cfg.audio_pool_step
    x = F.avg_pool1d(x.transpose(1, 2), step, step).transpose(1, 2)
    tokens = ((lens - 1) // 2 + 1 - step) // step + 1
    return [x[i, : int(t)] for i, t in enumerate(tokens)]


def clip_embeddings(w: Mapping[str, torch.Tensor], cfg: MiniCPMOConfig, clips: Sequence[np.ndarray]
                    ) -> list[torch.Tensor]:
    """Waveforms (16 kHz) of one prompt -> per clip [T, D]: pieces, features, ONE batch, concatenated."""
    pieces = [audio_pieces(c) for c in clips]
    feats = [whisper_log_mel(p) for ps in pieces for p in ps]
    embeds = audio_embeddings(w, cfg, feats)
    out, start = [], 0
    for ps in pieces:
        out.append(torch.cat(embeds[start:start + len(ps)], dim=0))
        start += len(ps)
    return out
