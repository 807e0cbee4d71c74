"""The checkpoint's `llm.*` weights rewritten for the peers, one tensor at a time (low memory).

- write_hf_qwen2: a plain Hugging Face Qwen2ForCausalLM folder (config.json, safetensors shards
  with `model.*` / `lm_head.*` names, the tokenizer), for onnxruntime-genai's model builder.
  Tensor bytes are copied unchanged (BF16 stays BF16), shard by shard.
- write_gguf: a llama.cpp GGUF (qwen2 architecture): 2-D weights in BF16/F16/F32 as stored, 1-D
  tensors (norms, biases) in F32, GPT-2-style BPE tokenizer metadata.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from minicpmo.export.checkpoint import TOKENIZER_FILES, Checkpoint

log = logging.getLogger("benchmarks.convert")
LLM = "llm."
SHARD_BYTES = 2_000_000_000
QWEN2_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "initializer_range",
              "max_window_layers", "sliding_window", "use_sliding_window", "attention_dropout")


def llm_names(ckpt: Checkpoint) -> list[str]:
    return [k for k in ckpt.keys() if k.startswith(LLM)]


def _raw(ckpt: Checkpoint, name: str) -> np.ndarray:
    """A tensor's bytes as stored (uint8 [nbytes]), read from its file range."""
    info = ckpt.info(name)
    return np.fromfile(info.file, dtype=np.uint8, count=info.end - info.start, offset=info.start)


# ---------------------------------------------------------------- Hugging Face Qwen2

def write_hf_qwen2(ckpt: Checkpoint, out: Path) -> Path:
    """A Qwen2ForCausalLM folder with the checkpoint's LLM weights; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    raw = ckpt.config.raw
    config = {k: raw[k] for k in QWEN2_KEYS if k in raw}
    config |= {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": _torch_dtype(ckpt),
               "use_cache": True}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _write_shards(ckpt, out)
    _copy_tokenizer(ckpt, out)
    return out


def _torch_dtype(ckpt: Checkpoint) -> str:
    dtype = ckpt.dtype("llm.model.embed_tokens.weight")
    return {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32")


def _write_shards(ckpt: Checkpoint, out: Path) -> None:
    shards: list[list[str]] = [[]]
    size = 0
    for name in llm_names(ckpt):
        nbytes = ckpt.info(name).end - ckpt.info(name).start
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(ckpt, names, out / fname)
        weight_map |= {n[len(LLM):]: fname for n in names}
        log.info("wrote %s (%d tensors)", fname, len(names))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_safetensors(ckpt: Checkpoint, names: list[str], path: Path) -> None:
    """safetensors = 8-byte header length + JSON header + raw tensor bytes, written tensor by tensor."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        info = ckpt.info(n)
        nbytes = info.end - info.start
        header[n[len(LLM):]] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n in names:
            _raw(ckpt, n).tofile(f)


def _copy_tokenizer(ckpt: Checkpoint, out: Path) -> None:
    """Copy the tokenizer files; the config names the stock Qwen2 fast tokenizer (no remote code)."""
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, out / name)
    tcfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    tcfg.pop("auto_map", None)
    tcfg["tokenizer_class"] = "Qwen2TokenizerFast"
    tcfg_path.write_text(json.dumps(tcfg, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- GGUF (llama.cpp)

def gguf_name(name: str) -> str:
    """Upstream `llm.*` name -> llama.cpp tensor name."""
    n = name[len(LLM):]
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if n in fixed:
        return fixed[n]
    parts = n.split(".")  # model.layers.{i}.{module}.{proj}.{weight|bias} or model.layers.{i}.{norm}.weight
    i, rest = parts[2], ".".join(parts[3:])
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{table[module]}.{kind}"


def write_gguf(ckpt: Checkpoint, path: Path) -> Path:
    """An unquantized qwen2 GGUF of the LLM (the input of llama.cpp's quantizer); returns `path`."""
    import gguf

    d = ckpt.config.decoder
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("minicpmo-llm")
    w.add_context_length(d.max_position_embeddings)
    w.add_embedding_length(d.hidden_size)
    w.add_block_count(d.num_hidden_layers)
    w.add_feed_forward_length(d.intermediate_size)
    w.add_head_count(d.num_attention_heads)
    w.add_head_count_kv(d.num_key_value_heads)
    w.add_rope_freq_base(d.rope_theta)
    w.add_layer_norm_rms_eps(d.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(w, ckpt, d.vocab_size)
    plan = [(n, *_gguf_tensor_kind(ckpt, n)) for n in llm_names(ckpt)]
    for name, kind, nbytes in plan:
        shape = ckpt.shape(name)
        if kind == "BF16":
            w.add_tensor_info(gguf_name(name), [*shape[:-1], shape[-1] * 2], np.dtype(np.uint8), nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor_info(gguf_name(name), shape, np.dtype(kind), nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, kind, _ in plan:
        w.write_tensor_data(_gguf_data(ckpt, name, kind))
    w.close()
    return path


def _gguf_tensor_kind(ckpt: Checkpoint, name: str) -> tuple[str, int]:
    shape = ckpt.shape(name)
    n = int(np.prod(shape))
    if len(shape) == 1:
        return "float32", 4 * n
    if ckpt.dtype(name) == "BF16":
        return "BF16", 2 * n
    if ckpt.dtype(name) == "F32":  # e.g. weights dequantized from another GGUF: keep them exact
        return "float32", 4 * n
    return "float16", 2 * n


def _gguf_data(ckpt: Checkpoint, name: str, kind: str) -> np.ndarray:
    if kind == "BF16":
        return _raw(ckpt, name)
    return ckpt.read(name).astype(kind)


def _add_tokenizer(w, ckpt: Checkpoint, vocab_size: int) -> None:
    """GPT-2-style BPE vocab (what llama.cpp's qwen2 loader expects), padded to the embedding rows."""
    import gguf

    tok = json.loads((ckpt.folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ValueError(f"tokenizer id {max(tokens)} >= vocab_size {vocab_size}")
    for i in range(vocab_size):
        if i not in tokens:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([tokens[i] for i in range(vocab_size)])
    w.add_token_types([types[i] for i in range(vocab_size)])
    w.add_token_merges(merges)
    eos = ckpt.config.decoder.eos_token_id
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else (eos if eos is not None else 0))
    if ckpt.config.decoder.bos_token_id is not None:
        w.add_bos_token_id(ckpt.config.decoder.bos_token_id)
    w.add_add_bos_token(False)
