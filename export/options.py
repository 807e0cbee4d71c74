"""The exporter's knobs: the only settings `export_bundle` takes."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

PRECISIONS = ("int4", "int8", "fp32")
# "int4+int8": an int4 head whose best candidates are rescored with int8 weights (ops.rescored_head);
# "int2+int8": the same with a 2-bit scan (fewer bytes per token, a coarser choice of candidates)
RESCORED_HEADS = {"int4+int8": 4, "int2+int8": 2}  # the scan's bits
HEAD_PRECISIONS = (*PRECISIONS, *RESCORED_HEADS)
VISION_PRECISIONS = ("fp32", "fp16", "int8")
DECODER_DTYPES = ("fp32", "fp16")
BLOCK_SIZES = (16, 32, 64, 128, 256)
KV_CACHES = ("auto", "int8")
TTS_PRECISIONS = ("int8", "int4", "fp32")


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "int4"  # decoder linear layers
    lm_head_precision: str | None = None  # None: see head_precision
    vision_precision: str = "fp32"  # vision encoder + resampler (+ audio encoder)
    # Decode on a CPU is memory-bound, and ONNX Runtime's kernel (MLAS, accuracy level 4) packs every
    # block as its 4-bit codes plus an fp32 scale and an fp32 block sum: 4.5 bits per weight at 128,
    # llama.cpp Q4_0's bytes, so 128 decodes at least as fast as Q4_0 (1.09x at 7B, in one process,
    # benchmarks/RESULTS.md section 6). Its reconstruction error is 9.5% (with quant.py's range search)
    # against 8.7% at 64 (5 bits packed, 0.96x Q4_0 in the host's slow state) and Q4_0's 8.6%; 256 is
    # faster still and less exact. On trained weights (Qwen2.5-Coder-1.5B, benchmarks/RESULTS.md section 11)
    # block 128's mean KL is 1.4x llama.cpp Q4_0's; block 64 with imatrix_text matches Q4_0's.
    block_size: int = 128
    accuracy_level: int = 4  # MatMulNBits: 4 = int8 activations (fastest on CPU), 0 = fp32
    audio: bool = True  # export the audio encoder when the checkpoint has one
    # The decoder's activations, norms, quantization scales and KV cache. fp16 is the GPU variant:
    # ONNX Runtime's CUDA GroupQueryAttention has fp16/bf16 kernels only, and fp16 halves the KV
    # cache. fp32 is the CPU default (x86 CPUs have no fast fp16 arithmetic).
    decoder_dtype: str = "fp32"
    # The KV cache: "auto" = the decoder dtype. "int8" (fp32 decoder only, CPU): ORT's
    # GroupQueryAttention stores K and V as int8 with static per-channel scales, which the export
    # calibrates by running the bundle on `kv_calibration_text` (None: a short built-in set).
    kv_cache: str = "auto"
    kv_calibration_text: str | None = None
    # Per-tensor exceptions to `precision` and `accuracy_level` for the decoder's linear layers, as
    # (pattern, value) pairs matched with fnmatch against the layer's graph name less "/model/"
    # ("layers.0/mlp/down_proj", "layers.*/attn/qkv_proj"); the last matching pair wins. llama.cpp's
    # quantizer has the same idea (`--tensor-type ffn_down=q8_0`): a few sensitive tensors kept finer.
    tensor_precision: tuple[tuple[str, str], ...] = ()
    tensor_accuracy: tuple[tuple[str, int], ...] = ()
    # A text file whose activations weight the 4-bit (and 2-bit) range search of the decoder and its
    # head (export/imatrix.py: llama.cpp's importance matrix, measured while exporting). None: unweighted.
    imatrix_text: str | None = None
    # Speech: export the TTS decoder, DVAE decoder and Vocos when the checkpoint has tts.* weights. The
    # TTS decoder's linear layers (the DVAE and Vocos stay fp32: convolutions, a few MB): int8 by
    # default, as its sampled codes feed back into it and its 626-way heads are small.
    tts: bool = True
    tts_precision: str = "int8"
    # Voices to carry besides the checkpoint's own (export/voices.py): (name, reference clip path) pairs.
    voices: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lm_head_precision is not None and self.lm_head_precision not in HEAD_PRECISIONS:
            raise ValueError(f"lm_head precision must be one of {HEAD_PRECISIONS}, got {self.lm_head_precision!r}")
        if self.vision_precision not in VISION_PRECISIONS:
            raise ValueError(f"vision precision must be one of {VISION_PRECISIONS}, got {self.vision_precision!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.decoder_dtype not in DECODER_DTYPES:
            raise ValueError(f"decoder dtype must be one of {DECODER_DTYPES}, got {self.decoder_dtype!r}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"kv cache must be one of {KV_CACHES}, got {self.kv_cache!r}")
        if self.kv_cache == "int8" and self.decoder_dtype != "fp32":
            raise ValueError("an int8 KV cache needs the fp32 decoder (ONNX Runtime's int8 cache is a CPU "
                             "GroupQueryAttention feature; the fp16 decoder is the GPU variant)")
        if self.lm_head_precision == "int2+int8" and self.decoder_dtype != "fp32":
            raise ValueError("the int2+int8 head is for the CPU (fp32) decoder: its 2-bit scan is an MLAS kernel, "
                             "and a GPU step is not bound by the head's bytes")
        if self.kv_calibration_text is not None and self.kv_cache != "int8":
            raise ValueError("a KV calibration text is only used with an int8 KV cache (--kv-cache int8)")
        if self.tts_precision not in TTS_PRECISIONS:
            raise ValueError(f"tts precision must be one of {TTS_PRECISIONS}, got {self.tts_precision!r}")
        if not 0 <= self.accuracy_level <= 4:
            raise ValueError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        for pattern, value in self.tensor_precision:
            if value not in PRECISIONS:
                raise ValueError(f"tensor precision for {pattern!r} must be one of {PRECISIONS}, got {value!r}")
        for pattern, value in self.tensor_accuracy:
            if not isinstance(value, int) or not 0 <= value <= 4:
                raise ValueError(f"tensor accuracy level for {pattern!r} must be 0..4, got {value!r}")

    def linear_settings(self, name: str) -> tuple[str, int]:
        """(precision, accuracy level) of the decoder linear layer `name` (its graph name)."""
        short = name.removeprefix("/model/")
        precision = next((v for p, v in reversed(self.tensor_precision) if fnmatchcase(short, p)), self.precision)
        level = next((v for p, v in reversed(self.tensor_accuracy) if fnmatchcase(short, p)), self.accuracy_level)
        return precision, level

    @property
    def head_precision(self) -> str:
        """int4 layers get the int4+int8 head on the CPU decoder: decoding reads every head weight per
        token, and the int4 scan reads half of an int8 head's bytes (the head is 13% of a 7B step's bytes,
        25% at 1.5B) while the tokens that can win keep int8-accurate logits (ops.rescored_head). The
        fp16 (GPU) decoder keeps a plain int8 head, as llama.cpp keeps output.weight at Q6_K: a GPU step
        is not bound by the head's bytes, and TopK would be one more kernel in the replayed graph."""
        if self.lm_head_precision:
            return self.lm_head_precision
        if self.precision == "int4":
            return "int4+int8" if self.decoder_dtype == "fp32" else "int8"
        return self.precision
