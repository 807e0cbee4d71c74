"""One benchmark step in its own process: `python -m benchmarks.worker STEP ARGS_JSON OUT_JSON`.

Each step imports only what it needs, so a peer's measured process holds only that peer.
A failure is written to OUT_JSON as {"error": ...} (exit code 1) for the orchestrator to report.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from .common import Protocol, files_bytes, setup_logging, write_json


def _proto(a: dict) -> Protocol:
    return Protocol(**a["protocol"])


def bandwidth(a: dict) -> dict:
    from .bandwidth import read_bandwidth
    from .common import wait_for_quiet

    wait_for_quiet("bandwidth")
    return read_bandwidth(a["threads"], a.get("gib", 2.0), a.get("repeats", 5))


def dims(a: dict) -> dict:
    from minicpmo.export.hf_config import load_config

    d = load_config(a["ckpt"]).decoder
    return {"num_layers": d.num_hidden_layers, "num_kv_heads": d.num_key_value_heads, "head_dim": d.head_dim,
            "hidden_size": d.hidden_size, "intermediate_size": d.intermediate_size, "vocab_size": d.vocab_size,
            "num_attention_heads": d.num_attention_heads}


def ours_export(a: dict) -> dict:
    from .peer_ours import DECODER_FILES, export
    from .weightbytes import onnx_bytes_per_token

    out = Path(a["out"])
    res = export(Path(a["ckpt"]), out, block_size=a["block_size"], accuracy_level=a["accuracy_level"],
                 head_precision=a.get("head_precision"), kv_cache=a.get("kv_cache"), timeout_s=a.get("timeout_s"))
    res["artifact"] = str(out)
    if res["ok"]:
        res["file_bytes"] = files_bytes([out / f for f in DECODER_FILES])
        res["weight_bytes_per_token"] = onnx_bytes_per_token(out / "decoder.onnx")
    return res


def ours_measure(a: dict) -> dict:
    from .peer_ours import measure

    return measure(Path(a["bundle"]), _proto(a))


def hf_qwen2(a: dict) -> dict:
    from minicpmo.export.checkpoint import open_checkpoint

    from .convert import write_hf_qwen2

    return {"path": str(write_hf_qwen2(open_checkpoint(a["ckpt"]), Path(a["out"])))}


def ortgenai_build(a: dict) -> dict:
    from .peer_ortgenai import build
    from .weightbytes import onnx_bytes_per_token

    out = Path(a["out"])
    res = build(Path(a["hf"]), out, block_size=a["block_size"], accuracy_level=a["accuracy_level"],
                extra=tuple(a.get("extra", ())), timeout_s=a.get("timeout_s"))
    res["artifact"] = str(out)
    if res["ok"]:
        res["file_bytes"] = files_bytes([p for p in out.iterdir() if p.name.startswith("model.onnx")])
        res["weight_bytes_per_token"] = onnx_bytes_per_token(out / "model.onnx")
    return res


def ortgenai_measure(a: dict) -> dict:
    from .peer_ortgenai import measure

    return measure(Path(a["model"]), _proto(a))


def gguf_f16(a: dict) -> dict:
    from minicpmo.export.checkpoint import open_checkpoint

    from .convert import write_gguf

    return {"path": str(write_gguf(open_checkpoint(a["ckpt"]), Path(a["out"])))}


def llamacpp_quantize(a: dict) -> dict:
    from .peer_llamacpp import quantize
    from .weightbytes import gguf_bytes_per_token

    out = quantize(Path(a["src"]), Path(a["out"]), a["qtype"], a["threads"])
    return {"ok": True, "artifact": str(out), "file_bytes": out.stat().st_size, "weight_bytes_per_token": gguf_bytes_per_token(out)}


def llamacpp_measure(a: dict) -> dict:
    from .peer_llamacpp import measure

    return measure(Path(a["model"]), _proto(a), a["dims"])


def torch_measure(a: dict) -> dict:
    from .peer_torch import measure

    return measure(Path(a["ckpt"]), a["dtype"], _proto(a))


def interleaved(a: dict) -> dict:
    from .interleaved import run

    return run(a["ours"], a["ortgenai"], a["gguf"], _proto(a), a["rounds"], a["chunk"])


def profile(a: dict) -> dict:
    from .profile_decode import profile_decode

    return profile_decode(Path(a["bundle"]), threads=a["threads"], steps=a["steps"],
                          prompt_tokens=a["prompt_tokens"], out_dir=Path(a["out_dir"]))


STEPS = {f.__name__: f for f in (bandwidth, dims, ours_export, ours_measure, hf_qwen2, ortgenai_build,
                                 ortgenai_measure, gguf_f16, llamacpp_quantize, llamacpp_measure,
                                 torch_measure, interleaved, profile)}


def main(argv: list[str]) -> int:
    setup_logging()
    step, args, out = argv[0], json.loads(argv[1]), Path(argv[2])
    try:
        result = STEPS[step](args)
    except Exception as e:  # reported to the orchestrator, which carries on with the other peers
        traceback.print_exc()
        write_json(out, {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        return 1
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
