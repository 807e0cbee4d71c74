"""Peers comparison: the same LLM weights through ours, onnxruntime-genai, llama.cpp and PyTorch.

    python -m benchmarks.peers CKPT [--threads 2] [--repeats 3] [--peers ours,llamacpp-q4_0,...] [--json]

CKPT is a MiniCPM-o 2.6 checkpoint folder (`minicpmo synth DIR --size small|full` or the real one).
Every peer is prepared (exported / converted / quantized) and then measured in its own process;
progress goes to stderr, the table (or --json) to stdout. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .common import Protocol, setup_logging
from .procs import run_worker
from .report import add_ratios, markdown_table, merge_rounds

log = logging.getLogger("benchmarks.peers")


@dataclass(frozen=True)
class Peer:
    label: str
    family: str  # ours | ortgenai | llamacpp | torch
    options: dict = field(default_factory=dict)


PEERS = {
    # The head precision is explicit in every key: bundles exported under an older default stay valid
    # for --reuse. The default is block 128 with the int4+int8 head (ours-b128-head48).
    "ours": Peer("ours int4 b32 (lm_head int8)", "ours", {"block_size": 32, "head_precision": "int8"}),
    "ours-b64": Peer("ours int4 b64 (lm_head int8)", "ours", {"block_size": 64, "head_precision": "int8"}),
    "ours-b128": Peer("ours int4 b128 (lm_head int8)", "ours", {"block_size": 128, "head_precision": "int8"}),
    "ours-head4": Peer("ours int4 b32 (lm_head int4)", "ours", {"block_size": 32, "head_precision": "int4"}),
    "ours-b64-head4": Peer("ours int4 b64 (lm_head int4)", "ours", {"block_size": 64, "head_precision": "int4"}),
    # the int4 head with its 64 best tokens rescored from int8 rows (ops.rescored_head); the default at
    # block 128 (Q4_0's bytes in MLAS's packed layout; RESULTS.md §6)
    "ours-b64-head48": Peer("ours int4 b64 (lm_head int4+int8)", "ours",
                            {"block_size": 64, "head_precision": "int4+int8"}),
    "ours-b128-head48": Peer("ours int4 b128 (lm_head int4+int8, default)", "ours",
                             {"block_size": 128, "head_precision": "int4+int8"}),
    # block 256: 4.25 bits per weight in MLAS's packed layout against block 32's 6
    "ours-b256-head48": Peer("ours int4 b256 (lm_head int4+int8)", "ours",
                             {"block_size": 256, "head_precision": "int4+int8"}),
    # ... with the int8 KV cache: decode attention reads a quarter of the cache's bytes
    "ours-b256-kv8": Peer("ours int4 b256 (lm_head int4+int8, int8 KV cache)", "ours",
                          {"block_size": 256, "head_precision": "int4+int8", "kv_cache": "int8"}),
    # ... and the 2-bit head scan: the fewest bytes per token of all
    "ours-b256-kv8-head28": Peer("ours int4 b256 (lm_head int2+int8, int8 KV cache)", "ours",
                                 {"block_size": 256, "head_precision": "int2+int8", "kv_cache": "int8"}),
    # the speed options together: fewest bytes, most error (both measured in RESULTS.md)
    "ours-b128-head4": Peer("ours int4 b128 (lm_head int4)", "ours", {"block_size": 128, "head_precision": "int4"}),
    "ortgenai": Peer("onnxruntime-genai int4 b32", "ortgenai", {"extra": []}),
    "ortgenai-prune": Peer("onnxruntime-genai int4 b32 + prune_lm_head", "ortgenai",
                           {"extra": ["prune_lm_head=true"]}),
    "llamacpp-q4_0": Peer("llama.cpp Q4_0", "llamacpp", {"qtype": "Q4_0"}),
    "llamacpp-q4_k_m": Peer("llama.cpp Q4_K_M", "llamacpp", {"qtype": "Q4_K_M"}),
    "llamacpp-q5_0": Peer("llama.cpp Q5_0", "llamacpp", {"qtype": "Q5_0"}),
    "llamacpp-q8_0": Peer("llama.cpp Q8_0", "llamacpp", {"qtype": "Q8_0"}),
    "torch-fp32": Peer("PyTorch eager fp32", "torch", {"dtype": "fp32"}),
    "torch-bf16": Peer("PyTorch eager bf16", "torch", {"dtype": "bf16"}),
}
DEFAULT_PEERS = ("ours-b128-head48", "ours-b64-head48", "ours-b256-head48", "ours-b256-kv8-head28", "ortgenai",
                 "ortgenai-prune", "llamacpp-q4_0", "llamacpp-q4_k_m", "torch-fp32", "torch-bf16")
# Peak memory of a preparation or run in bytes per LLM parameter, and at least MEMORY_FLOOR bytes
# (ortgenai: its builder with the streaming int4 pass of benchmarks/ortgenai_build.py, measured at
# 13.3 GB for 7.61e9 parameters and 7.3 GB for 1.78e9); a step whose estimate exceeds the memory
# available is skipped.
MEMORY_PER_PARAM = {"ortgenai": 1.8, "torch-fp32": 4.1, "torch-bf16": 2.1}
MEMORY_FLOOR = {"ortgenai": 7.5e9}


class Runner:
    def __init__(self, ckpt: Path, work: Path, proto: Protocol, reuse: bool, timeout_s: float | None,
                 force: bool, acc_level: int, prepare_only: bool = False):
        self.ckpt, self.work, self.proto, self.prepare_only = ckpt, work, proto, prepare_only
        self.reuse, self.timeout_s, self.force, self.acc_level = reuse, timeout_s, force, acc_level
        self.dims: dict = {}

    def worker(self, step: str, args: dict) -> dict:
        log.info("-- %s", step)
        res = run_worker(step, args, timeout_s=self.timeout_s)
        if "error" in res:
            log.warning("%s failed: %s", step, res["error"])
        return res

    def probe(self) -> float:
        """Read bandwidth now (a small, separate process: the machine's bandwidth drifts)."""
        res = run_worker("bandwidth", {"threads": self.proto.threads, "gib": 0.5, "repeats": 3})
        return res.get("best_bytes_per_s", 0.0)

    def prepared(self, name: str, step: str, args: dict) -> dict:
        """Run a preparation step once; with --reuse, an earlier successful result is kept."""
        res = self.reusable(name)
        if res is not None:
            return res
        res = self.worker(step, args)
        if "error" not in res and res.get("ok", True):
            (self.work / f"{name}.prepare.json").write_text(json.dumps(res, indent=2))
        return res

    def reusable(self, name: str) -> dict | None:
        """With --reuse, the record of an earlier successful step whose output still exists."""
        record = self.work / f"{name}.prepare.json"
        if not (self.reuse and record.is_file()):
            return None
        res = json.loads(record.read_text())
        output = res.get("artifact") or res.get("path")
        if res.get("ok", "error" not in res) and (output is None or Path(output).exists()):
            log.info("-- %s: reusing %s", name, record)
            return res
        return None

    # ---------------------------------------------------------------- per family
    def run(self, key: str, peer: Peer) -> dict:
        row = {"peer": key, "label": peer.label, "family": peer.family}
        skip = self._too_big(key, peer)
        if skip:
            return row | {"skipped": skip}
        prep = getattr(self, f"_prepare_{peer.family}")(key, peer)
        row["prepare"] = {k: prep.get(k, prep.get("process", {}).get(k)) for k in ("seconds", "peak_rss_bytes")}
        row["prepare"]["command"] = prep.get("command")  # child-running steps report the child's figures
        if "error" in prep or not prep.get("ok", True):
            return row | {"error": f"preparation: {prep.get('error', 'failed')}"}
        row["file_bytes"] = prep.get("file_bytes")
        row["artifact"] = prep.get("artifact")
        row["weight_bytes_per_token"] = prep.get("weight_bytes_per_token")
        if self.prepare_only:
            return row | {"skipped": "--prepare-only"}
        before = self.probe()
        res = self.worker(f"{peer.family}_measure", self._measure_args(peer, prep))
        if "error" in res:
            return row | {"error": f"measurement: {res['error']}"}
        after = self.probe()
        row["bandwidth_probe"] = {"before": before, "after": after, "best_bytes_per_s": (before + after) / 2}
        row |= {k: v for k, v in res.items() if k not in ("process", "header")}
        row["process_peak_rss_bytes"] = res["process"]["peak_rss_bytes"]  # includes the bandwidth probes
        if "header" in res:
            row["header"] = res["header"]
        return row

    def _too_big(self, key: str, peer: Peer) -> str | None:
        per_param = MEMORY_PER_PARAM.get(key, MEMORY_PER_PARAM.get(peer.family))
        if per_param is None or self.force:
            return None
        need = max(per_param * self.dims["llm_params"], MEMORY_FLOOR.get(peer.family, 0))
        have = _mem_available()
        if need > have:
            return (f"needs ~{need / 1e9:.0f} GB ({per_param} B/param), {have / 1e9:.0f} GB available "
                    "(--force to try anyway)")
        return None

    def _prepare_ours(self, key: str, peer: Peer) -> dict:
        o = peer.options
        return self.prepared(key, "ours_export", {
            "ckpt": str(self.ckpt), "out": str(self.work / key), "block_size": o["block_size"],
            "accuracy_level": self.acc_level, "head_precision": o.get("head_precision"),
            "kv_cache": o.get("kv_cache"), "timeout_s": self.timeout_s})

    def _prepare_ortgenai(self, key: str, peer: Peer) -> dict:
        if (done := self.reusable(key)) is not None:  # its source copy may be gone: not needed
            return done
        hf = self.prepared("hf-qwen2", "hf_qwen2", {"ckpt": str(self.ckpt), "out": str(self.work / "hf-qwen2")})
        if "error" in hf:
            return hf
        return self.prepared(key, "ortgenai_build", {
            "hf": hf["path"], "out": str(self.work / key), "block_size": 32, "accuracy_level": self.acc_level,
            "extra": peer.options["extra"], "timeout_s": self.timeout_s})

    def _prepare_llamacpp(self, key: str, peer: Peer) -> dict:
        if (done := self.reusable(key)) is not None:  # its BF16 source GGUF may be gone: not needed
            return done
        src = self.prepared("llm-gguf", "gguf_f16", {"ckpt": str(self.ckpt), "out": str(self.work / "llm.gguf")})
        if "error" in src:
            return src
        return self.prepared(key, "llamacpp_quantize", {
            "src": src["path"], "out": str(self.work / f"{key}.gguf"), "qtype": peer.options["qtype"],
            "threads": self.proto.threads})

    def _prepare_torch(self, key: str, peer: Peer) -> dict:
        return {"ok": True, "file_bytes": self.dims["llm_checkpoint_bytes"]}

    def _measure_args(self, peer: Peer, prep: dict) -> dict:
        a = {"protocol": asdict(self.proto)}
        if peer.family == "ours":
            return a | {"bundle": prep["artifact"]}
        if peer.family in ("ortgenai", "llamacpp"):
            return a | {"model": prep["artifact"], "dims": self.dims}
        return a | {"ckpt": str(self.ckpt), "dtype": peer.options["dtype"]}


def interleaved_pass(runner: Runner, rows: list[dict], rounds: int, chunk: int) -> dict:
    """Every prepared ours / onnxruntime-genai / llama.cpp artifact in ONE process, decoding in turns
    (benchmarks/interleaved.py): the ratios that cancel the host's drift. PyTorch is left out (its
    fp32 copy alone is 4 bytes per parameter)."""
    picked = {"ours": [], "ortgenai": [], "gguf": []}
    need = 0
    for r in rows:
        if r.get("artifact") and r["family"] in ("ours", "ortgenai", "llamacpp") and "error" not in r:
            picked["gguf" if r["family"] == "llamacpp" else r["family"]].append(r["artifact"])
            # what one engine holds while the others run: its own measured peak, else ~1.3x its file
            need += r.get("peak_rss_bytes") or int(1.3 * (r.get("file_bytes") or 0))
    if sum(map(len, picked.values())) < 2:
        return {"skipped": "fewer than two prepared engines"}
    have = _mem_available()
    if need > have and not runner.force:
        return {"skipped": f"the engines together need ~{need / 1e9:.0f} GB, {have / 1e9:.0f} GB available "
                           "(interleave fewer peers, or --force)"}
    return runner.worker("interleaved", picked | {"protocol": asdict(runner.proto), "rounds": rounds,
                                                  "chunk": chunk})


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _checkpoint_dims(runner: Runner) -> dict:
    d = runner.worker("dims", {"ckpt": str(runner.ckpt)})
    if "error" in d:
        raise SystemExit(f"error: cannot read {runner.ckpt}: {d['error']}")
    h, i, v, n = d["hidden_size"], d["intermediate_size"], d["vocab_size"], d["num_layers"]
    kv = d["num_kv_heads"] * d["head_dim"]
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    d["llm_params"] = n * per_layer + 2 * v * h + h
    d["llm_checkpoint_bytes"] = 2 * d["llm_params"]  # BF16 as stored upstream
    return {k: v for k, v in d.items() if k != "process"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="MiniCPM-o 2.6 checkpoint folder (minicpmo synth DIR --size small)")
    p.add_argument("--work", type=Path, help="folder for exports/conversions [/tmp/minicpmo-peers/NAME]")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS), help=f"comma list from: {', '.join(PEERS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="medians over this many repeats (per round)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every peer this many times, in alternating order; medians over rounds")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits accuracy level (ours and ORT-genai)")
    p.add_argument("--bandwidth-gib", type=float, default=2.0)
    p.add_argument("--timeout", type=float, help="seconds allowed to each step (default: none)")
    p.add_argument("--reuse", action="store_true", help="keep earlier exports/conversions found in --work")
    p.add_argument("--prepare-only", action="store_true",
                   help="export/convert/quantize only (then measure later with --reuse)")
    p.add_argument("--force", action="store_true", help="try steps that look too big for this machine's memory")
    p.add_argument("--clean", action="store_true", help="delete the work folder at the end")
    p.add_argument("--interleaved", action="store_true",
                   help="then run the prepared engines (not PyTorch) in ONE process, decoding in turns: "
                        "ratios that cancel the host's drift (benchmarks/interleaved.py)")
    p.add_argument("--interleaved-rounds", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    keys = [k.strip() for k in args.peers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in PEERS]
    if unknown:
        print(f"error: unknown peer(s) {unknown}; choose from {list(PEERS)}", file=sys.stderr)
        return 2
    work = args.work or Path("/tmp/minicpmo-peers") / args.checkpoint.resolve().name
    work.mkdir(parents=True, exist_ok=True)
    proto = Protocol(args.prompt_tokens, args.decode_tokens, args.repeats, args.threads)
    runner = Runner(args.checkpoint.resolve(), work, proto, args.reuse, args.timeout, args.force,
                    args.accuracy_level, args.prepare_only)
    t0 = time.time()
    runner.dims = _checkpoint_dims(runner)
    bw = {} if args.prepare_only else runner.worker("bandwidth", {"threads": args.threads,
                                                                 "gib": args.bandwidth_gib})
    by_key: dict[str, list[dict]] = {k: [] for k in keys}
    for n in range(args.rounds):
        for key in keys if n % 2 == 0 else keys[::-1]:  # alternate the order: drift hits every peer alike
            row = runner.run(key, PEERS[key])
            by_key[key].append(row)
            log.info("round %d, %s: %s", n + 1, key,
                     {k: row.get(k) for k in ("prefill_tok_s", "decode_tok_s", "error", "skipped")})
        runner.reuse = True  # later rounds measure what the first one prepared
    rows = [merge_rounds(by_key[k]) for k in keys]
    add_ratios(rows, bw.get("best_bytes_per_s"), proto)
    extra = {}
    if args.interleaved and not args.prepare_only:
        log.info("-- interleaved pass: %d rounds", args.interleaved_rounds)
        extra["interleaved"] = interleaved_pass(runner, rows, args.interleaved_rounds, chunk=16)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": str(args.checkpoint),
              "protocol": asdict(proto), "rounds": args.rounds, "dims": runner.dims, "bandwidth": bw, "rows": rows,
              **extra, "seconds": round(time.time() - t0)}
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
