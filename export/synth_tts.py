"""The speech parts of a synthetic checkpoint: `tts.*` tensors, `assets/chattts_tokenizer/` and
`assets/Vocos.pt`, laid out as the real `openbmb/MiniCPM-o-2_6` folder has them.

"small" and "full" keep every real speech shape (the speech model's cost is then the real one);
"tiny" shrinks the TTS Llama, the DVAE and Vocos (config.json's tts_config carries the TTS sizes;
the DVAE and Vocos sizes are read back from the tensor shapes, as upstream hard-codes them). The
numbers that define the interface stay real at every size: 626 codes, 4 streams, 100 mel bins,
the 21,178-entry text vocabulary and its special ids, n_fft 1024, hop 256.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .torch_zip import save_state_dict
from .tts_tensors import DVAESizes, Shape, VocosSizes, vocos_tensors

TTS_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}
# ChatTTS's tokenizer: bert-base-chinese's 21,128 WordPiece entries, then these 50 added tokens
BERT_VOCAB = 21128
BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
CHATTTS_TOKENS = ("[Sasr] [Pasr] [Easr] [Stts] [Ptts] [Etts] [Sbreak] [Pbreak] [Ebreak] [uv_break] [v_break] "
                  "[lbreak] [llbreak] [undefine] [laugh] [spk_emb] [empty_spk] [music] [pure]").split()
CHATTTS_TOKENS += [f"[break_{i}]" for i in range(8)] + [f"[laugh_{i}]" for i in range(3)]
CHATTTS_TOKENS += [f"[oral_{i}]" for i in range(10)] + [f"[speed_{i}]" for i in range(10)]
TOKENIZER_DIR = "assets/chattts_tokenizer"
VOCOS_FILE = "assets/Vocos.pt"
_WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
          "by word but not what all were we when your can said there use an each which she do how their if will "
          "up other about out many then them these so some her would make like him into time has look two more "
          "write go see number no way could people my than first water been call who oil its now find long down "
          "day did get come made may part hello world good morning thank yes speak voice answer").split()


DVAE_TINY = DVAESizes(vq_dim=64, hidden=32, bottleneck=16, layers=2, decoder_out=32, downsample=32)
VOCOS_TINY = VocosSizes(dim=32, intermediate=64, layers=2)


def tts_config(size: str, llm_dim: int) -> dict:
    """config.json's tts_config for a size (the real one sets only model_type and llm_dim)."""
    return {"model_type": "conditional_chattts", "llm_dim": llm_dim, **(TTS_TINY if size == "tiny" else {})}


def tts_init_scale(name: str, shape: Shape) -> tuple[float, float] | None:
    """(mean, std) for the speech tensors whose generic scale (synth.init_scale) would not give a sane
    forward pass; None for the rest."""
    if name.endswith("parametrizations.weight.original0"):  # weight-norm g: logits ~ N(0, 3^2)
        return 3.0, 0.3
    if name == "tts.dvae.coef":  # upstream initializes it as rand(100): positive mel scales
        return 1.0, 0.1
    if name.endswith(".coef") or name.endswith(".gamma"):  # ConvNeXt layer scales
        return 0.3, 0.05
    return None


# ---------------------------------------------------------------- the ChatTTS tokenizer

def chattts_vocab() -> list[str]:
    """21,128 WordPiece entries shaped like bert-base-chinese's: [PAD], [unused*], the specials at
    100-103, ASCII, English words and word pieces, then CJK characters."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(33, 127)]
    vocab += [w for w in _WORDS if w not in vocab]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    cjk = 0x4E00
    while len(vocab) < BERT_VOCAB:
        vocab.append(chr(cjk))
        cjk += 1
    return vocab


def build_chattts_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(chattts_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BERT_SPECIALS])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CHATTTS_TOKENS])
    return tok


def write_chattts_tokenizer(folder: Path) -> None:
    """assets/chattts_tokenizer/: tokenizer.json, tokenizer_config.json, special_tokens_map.json
    (what `BertTokenizerFast.from_pretrained` reads)."""
    out = folder / TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    build_chattts_tokenizer().save(str(out / "tokenizer.json"))
    names = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "mask_token": "[MASK]"}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True}
               for i, t in [(v, k) for k, v in BERT_SPECIALS.items()] + list(enumerate(CHATTTS_TOKENS, BERT_VOCAB))}
    config = {"added_tokens_decoder": decoder, "clean_up_tokenization_spaces": True, "do_basic_tokenize": True,
              "do_lower_case": True, "model_max_length": 1000000000000000019884624838656, "never_split": None,
              "strip_accents": None, "tokenize_chinese_chars": True, "tokenizer_class": "BertTokenizerFast", **names}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- Vocos.pt

def hann_window(n: int) -> np.ndarray:
    """torch.hann_window(n) (periodic)."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def mel_filterbank(n_fft: int, mels: int, sample_rate: int = 24000) -> np.ndarray:
    """torchaudio's HTK mel filterbank [n_fft/2 + 1, mels] (norm None, 0 Hz to Nyquist)."""
    freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    mel = np.linspace(0, 2595 * np.log10(1 + sample_rate / 2 / 700), mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    down = (freqs[:, None] - hz[None, :-2]) / (hz[1:-1] - hz[:-2])
    up = (hz[None, 2:] - freqs[:, None]) / (hz[2:] - hz[1:-1])
    return np.maximum(0, np.minimum(down, up)).astype(np.float32)


def write_vocos(path: Path, sizes: VocosSizes, seed: int) -> None:
    """Random Vocos weights (fixed windows and filterbank) as a torch zip state dict, float32."""
    tensors = {}
    for name, shape in vocos_tensors(sizes).items():
        if name.endswith("window"):
            tensors[name] = hann_window(shape[0])
        elif name.endswith("mel_scale.fb"):
            tensors[name] = mel_filterbank(sizes.n_fft, sizes.mels)
        else:
            mean, std = _vocos_scale(name, shape)
            rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")])
            tensors[name] = (mean + std * rng.standard_normal(shape)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(path, tensors, archive="Vocos")


def _vocos_scale(name: str, shape: Shape) -> tuple[float, float]:
    if name.endswith(".gamma"):
        return 0.3, 0.05
    if len(shape) == 1:
        return (1.0, 0.05) if "norm" in name and name.endswith("weight") else (0.0, 0.02)
    if name == "head.out.weight":  # log-magnitudes and phases ~ N(0, 1): exp() stays tame
        return 0.0, 1.0 / math.sqrt(shape[1])
    return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))
