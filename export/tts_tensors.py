"""The names and shapes of the speech weights: `tts.*` of the checkpoint and the `Vocos.pt` state
dict, one table that the synthetic writer and the checkpoint reader share.

The TTS Llama's sizes come from tts_config; the DVAE's and Vocos's are hard-coded upstream, so a
reader takes them from the stored shapes (`dvae_sizes`, `vocos_sizes`) and then checks every tensor
against the table those sizes give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .tts_config import TTSConfig

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DVAESizes:
    """DVAE widths (upstream `DVAE()` hard-codes the real ones)."""
    vq_dim: int = 1024  # GFSQ dim: 2 groups of vq_dim / 2, which is also the decoder's input width
    hidden: int = 256
    bottleneck: int = 128
    layers: int = 12
    decoder_out: int = 512
    downsample: int = 512


@dataclass(frozen=True)
class VocosSizes:
    dim: int = 512
    intermediate: int = 1536
    layers: int = 8
    n_fft: int = 1024
    mels: int = 100


def tts_tensors(cfg: TTSConfig, dvae: DVAESizes) -> dict[str, Shape]:
    """The tts.* tensors in upstream order (ConditionalChatTTS: projector, emb_code, emb_text,
    head_code, dvae, model)."""
    h, codes = cfg.hidden_size, cfg.num_audio_tokens
    t: dict[str, Shape] = {"tts.projector.linear1.weight": (h, cfg.llm_dim), "tts.projector.linear1.bias": (h,),
                           "tts.projector.linear2.weight": (h, h), "tts.projector.linear2.bias": (h,)}
    t |= {f"tts.emb_code.{q}.weight": (codes, h) for q in range(cfg.num_vq)}
    t["tts.emb_text.weight"] = (cfg.num_text_tokens, h)
    for q in range(cfg.num_vq):  # weight_norm: g [out, 1] and v [out, in]
        t |= {f"tts.head_code.{q}.parametrizations.weight.original0": (codes, 1),
              f"tts.head_code.{q}.parametrizations.weight.original1": (codes, h)}
    t |= dvae_tensors(dvae, cfg.num_mel_bins)
    t["tts.model.embed_tokens.weight"] = (32000, h)  # LlamaModel's own table: unused (inputs_embeds only)
    for i in range(cfg.num_hidden_layers):
        p = f"tts.model.layers.{i}"
        t |= {f"{p}.self_attn.{n}.weight": (h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        t |= {f"{p}.mlp.gate_proj.weight": (cfg.intermediate_size, h), f"{p}.mlp.up_proj.weight": (cfg.intermediate_size, h),
              f"{p}.mlp.down_proj.weight": (h, cfg.intermediate_size), f"{p}.input_layernorm.weight": (h,),
              f"{p}.post_attention_layernorm.weight": (h,)}
    return t | {"tts.model.norm.weight": (h,)}


def dvae_tensors(d: DVAESizes, mels: int = 100) -> dict[str, Shape]:
    t: dict[str, Shape] = {"tts.dvae.coef": (1, mels, 1), "tts.dvae.downsample_conv.0.weight": (d.downsample, mels, 3),
                           "tts.dvae.downsample_conv.0.bias": (d.downsample,),
                           "tts.dvae.downsample_conv.2.weight": (d.downsample, d.downsample, 4),
                           "tts.dvae.downsample_conv.2.bias": (d.downsample,)}
    for part, inp, out in (("encoder", d.downsample, d.vq_dim), ("decoder", d.vq_dim // 2, d.decoder_out)):
        p = f"tts.dvae.{part}"
        t |= {f"{p}.conv_in.0.weight": (d.bottleneck, inp, 3), f"{p}.conv_in.0.bias": (d.bottleneck,),
              f"{p}.conv_in.2.weight": (d.hidden, d.bottleneck, 3), f"{p}.conv_in.2.bias": (d.hidden,)}
        for j in range(d.layers):
            b, c = f"{p}.decoder_block.{j}", d.hidden
            t |= {f"{b}.coef": (c,), f"{b}.dwconv.weight": (c, 1, 7), f"{b}.dwconv.bias": (c,),
                  f"{b}.norm.weight": (c,), f"{b}.norm.bias": (c,), f"{b}.pwconv1.weight": (4 * c, c),
                  f"{b}.pwconv1.bias": (4 * c,), f"{b}.pwconv2.weight": (c, 4 * c), f"{b}.pwconv2.bias": (c,)}
        t[f"{p}.conv_out.weight"] = (out, d.hidden, 1)
    t["tts.dvae.out_conv.weight"] = (mels, d.decoder_out, 3)
    for r in range(2):
        p = f"tts.dvae.vq_layer.quantizer.rvqs.{r}"
        t |= {f"{p}.project_in.weight": (4, d.vq_dim // 2), f"{p}.project_in.bias": (4,),
              f"{p}.project_out.weight": (d.vq_dim // 2, 4), f"{p}.project_out.bias": (d.vq_dim // 2,)}
    return t


def vocos_tensors(v: VocosSizes) -> dict[str, Shape]:
    """The state dict of upstream's `Vocos(MelSpectrogramFeatures, VocosBackbone, ISTFTHead)`."""
    bins = v.n_fft // 2 + 1
    t: dict[str, Shape] = {"feature_extractor.mel_spec.spectrogram.window": (v.n_fft,),
                           "feature_extractor.mel_spec.mel_scale.fb": (bins, v.mels),
                           "backbone.embed.weight": (v.dim, v.mels, 7), "backbone.embed.bias": (v.dim,),
                           "backbone.norm.weight": (v.dim,), "backbone.norm.bias": (v.dim,)}
    for i in range(v.layers):
        p = f"backbone.convnext.{i}"
        t |= {f"{p}.dwconv.weight": (v.dim, 1, 7), f"{p}.dwconv.bias": (v.dim,), f"{p}.norm.weight": (v.dim,),
              f"{p}.norm.bias": (v.dim,), f"{p}.pwconv1.weight": (v.intermediate, v.dim),
              f"{p}.pwconv1.bias": (v.intermediate,), f"{p}.pwconv2.weight": (v.dim, v.intermediate),
              f"{p}.pwconv2.bias": (v.dim,), f"{p}.gamma": (v.dim,)}
    return t | {"backbone.final_layer_norm.weight": (v.dim,), "backbone.final_layer_norm.bias": (v.dim,),
                "head.out.weight": (v.n_fft + 2, v.dim), "head.out.bias": (v.n_fft + 2,),
                "head.istft.window": (v.n_fft,)}


def dvae_sizes(shape: Callable[[str], Shape], layers: int) -> DVAESizes:
    """The DVAE widths a checkpoint holds (`shape(name)` reads one tensor's shape)."""
    return DVAESizes(vq_dim=2 * shape("tts.dvae.vq_layer.quantizer.rvqs.0.project_out.weight")[0],
                     hidden=shape("tts.dvae.decoder.conv_in.2.weight")[0],
                     bottleneck=shape("tts.dvae.decoder.conv_in.0.weight")[0], layers=layers,
                     decoder_out=shape("tts.dvae.decoder.conv_out.weight")[0],
                     downsample=shape("tts.dvae.downsample_conv.0.weight")[0])


def vocos_sizes(state: dict, layers: int) -> VocosSizes:
    """The Vocos widths of a state dict {name: array}."""
    dim, mels, _ = state["backbone.embed.weight"].shape
    return VocosSizes(dim=dim, intermediate=state["backbone.convnext.0.pwconv1.weight"].shape[0], layers=layers,
                      n_fft=state["head.out.weight"].shape[0] - 2, mels=mels)
