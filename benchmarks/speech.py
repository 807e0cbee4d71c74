"""Speech output: real-time factor and time to first audio of the TTS model + DVAE + Vocos, ONNX
Runtime (the bundle's graphs, runtime/speech.py's loop) against the PyTorch reference
(export/reference/tts.py) on the same weights, each in its own process (its RSS its own).

    python -m benchmarks.speech --checkpoint CKPT [--precisions int8,fp32] [--codes 250] [--threads 2]

The checkpoint's speech weights should have the real shapes (`minicpmo synth --size small` keeps
the real TTS, DVAE and Vocos shapes): speed depends on shapes, not values. Its speech graphs are
exported (export/bundle_speech.py, as `minicpmo export` writes them) into a scratch folder per TTS
precision, or `--bundle` names an exported bundle instead. Every run generates
exactly `--codes` codes (the end code is blocked: random weights end at random), decoded in
upstream's 25-code chunks with 4 codes of context. Figures:
- rtf: compute seconds per second of audio (prefill, code steps, DVAE, Vocos); <= 1 is real time;
  steady_rtf: the same for one 25-code chunk from the median stage times, without the one-off prefill
  (what a long reply tends to); steady_rtf_fastest from each stage's fastest run (on a shared host,
  near what an idle one gives);
- first_audio_s: from the start (prefill included) until the first chunk is handed out: once the
  first 25 codes are decoded (all but their last 4 codes' samples, which wait for the cross-fade);
- per stage: prefill of the 302-position condition, one code step (median), DVAE and Vocos per chunk;
- rss: the process's resident memory after loading the speech model and its peak (the LLM is not
  loaded: these are the audio path's own);
- the CPU seconds the process used per audio second, and the cores other processes used meanwhile
  (a shared host: wall-clock figures grow with them).
The torch engine samples nothing (argmax over codes 0-624): the same work per step as sampling,
which costs microseconds next to a step.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import ForeignLoad, peak_rss_bytes, setup_logging

log = logging.getLogger("benchmarks")
TEXT = ("The harbour was quiet in the early morning. Fishing boats rocked gently at their moorings, and "
        "a few gulls circled overhead, calling to each other above the grey water while the town woke up.")
CHUNK, CONTEXT = 25, 4


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Timer:
    def __init__(self):
        self.seconds: dict[str, list[float]] = {}

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.seconds.setdefault(name, []).append(time.perf_counter() - t0)
            return out
        return timed


def export_speech(checkpoint: Path, folder: Path, precision: str) -> None:
    """The speech graphs alone, with their manifest section in speech.json."""
    from minicpmo.export.bundle import _graph_io
    from minicpmo.export.bundle_speech import write_speech
    from minicpmo.export.checkpoint import open_checkpoint
    from minicpmo.export.options import ExportOptions

    folder.mkdir(parents=True, exist_ok=True)
    speech = write_speech(open_checkpoint(checkpoint), folder, ExportOptions(tts_precision=precision), _graph_io,
                          lambda *a, **k: None)
    (folder / "speech.json").write_text(json.dumps({"speech": speech}))


def run_onnx(bundle: Path, codes: int, threads: int, repeats: int) -> dict:
    from minicpmo.runtime.manifest import Manifest, load_manifest
    from minicpmo.runtime.speech import SpeechParams, SpeechStats, speak
    from minicpmo.runtime.tts_model import TTSModel

    scratch = bundle / "speech.json"
    manifest = Manifest(bundle, json.loads(scratch.read_text())) if scratch.is_file() else load_manifest(bundle)
    rss0 = current_rss_bytes()
    t0 = time.perf_counter()
    model = TTSModel.load(manifest, threads=threads)
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_bytes()
    timer = Timer()
    for name in ("prefill", "prefill_text", "step", "codes_to_mel", "mel_to_audio"):
        setattr(model, name, timer.wrap("prefill" if name == "prefill_text" else name, getattr(model, name)))
    info = manifest["speech"]
    hidden = np.random.default_rng(0).standard_normal(info["llm_dim"]).astype(np.float32)
    params = SpeechParams.from_manifest(info, seed=0, max_codes=codes, min_codes_per_chunk=info.get(
        "output_chunk_size", CHUNK))  # the end code stays blocked: exactly `codes` codes
    runs = []
    for _ in range(repeats):
        timer.seconds.clear()
        stats = SpeechStats()
        cpu0 = time.process_time()
        with ForeignLoad() as load:
            audio = sum(len(c) for c in speak(model, hidden, TEXT, params, stats))
        runs.append(_run_figures(stats.seconds, audio / 24000, stats.first_audio_seconds, timer, load.cores,
                                 time.process_time() - cpu0))
    return {"engine": f"onnxruntime {info['decoder']['precision']} TTS", "load_s": round(load_s, 2),
            "rss_before_mb": rss0 >> 20, "rss_loaded_mb": rss_loaded >> 20, "peak_rss_mb": peak_rss_bytes() >> 20,
            **_median_runs(runs)}


def run_torch(checkpoint: Path, codes: int, threads: int, repeats: int) -> dict:
    import torch

    from minicpmo.export.reference import tts as ref
    from minicpmo.export.reference.weights import load_weights
    from minicpmo.export.torch_zip import load_state_dict
    from minicpmo.export.tts_config import parse_tts_config

    torch.set_num_threads(threads)
    rss0 = current_rss_bytes()
    t0 = time.perf_counter()
    cfg = parse_tts_config(json.loads((checkpoint / "config.json").read_text()).get("tts_config"))
    w = load_weights(checkpoint, prefixes=("tts.",))
    vocos = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
             load_state_dict(checkpoint / "assets" / "Vocos.pt").items()}
    load_s, rss_loaded = time.perf_counter() - t0, current_rss_bytes()
    llm_dim = w["tts.projector.linear1.weight"].shape[1]
    hidden = torch.from_numpy(np.random.default_rng(0).standard_normal(llm_dim).astype(np.float32))
    ids = torch.arange(cfg.condition_length) % 1000 + 100  # the work does not depend on which ids
    mask = torch.ones(cfg.condition_length, dtype=torch.int8)
    runs = []
    with torch.no_grad():
        for _ in range(repeats):
            timer = Timer()
            cpu0 = time.process_time()
            with ForeignLoad() as load:
                seconds, audio, first = _torch_speak(ref, w, vocos, cfg, hidden, ids, mask, codes, timer)
            runs.append(_run_figures(seconds, audio / 24000, first, timer, load.cores, time.process_time() - cpu0))
    return {"engine": f"torch {torch.__version__} (eager fp32)", "load_s": round(load_s, 2),
            "rss_before_mb": rss0 >> 20, "rss_loaded_mb": rss_loaded >> 20, "peak_rss_mb": peak_rss_bytes() >> 20,
            **_median_runs(runs)}


def _torch_speak(ref, w, vocos, cfg, hidden, ids, mask, n_codes, timer):
    """The same schedule as runtime/speech.py: steps, then every 25 codes a DVAE + Vocos decode."""
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    cache = timer.wrap("prefill", ref.condition_cache)(w, cfg, ids, ref.speaker_embedding(w, hidden))
    x = F.embedding(torch.tensor([[cfg.audio_bos_token_id]]), w["tts.emb_text.weight"])
    codes, decoded, first, audio, pending = [], 0, None, 0, False
    step = timer.wrap("step", lambda x, cache: ref.tts_forward(
        w, cfg, x, cache, ref.generation_bias(cfg, cache[0][0].shape[2], mask)))
    dvae, voc = timer.wrap("codes_to_mel", ref.dvae_decode), timer.wrap("mel_to_audio", ref.vocos_decode)
    while len(codes) < n_codes:
        logits, cache = step(x, cache)
        c = logits[0, -1, :, :625].argmax(-1)
        codes.append(c)
        x = ref.code_embeds(w, cfg, c[None])
        if len(codes) % CHUNK == 0 or len(codes) == n_codes:
            ctx = min(CONTEXT, decoded)
            block = torch.stack(codes[decoded - ctx:]).T[None]  # [1, 4, T]
            wav = voc(vocos, dvae(w, block))
            audio += wav.shape[-1] - (wav.shape[-1] * ctx // block.shape[-1])
            decoded = len(codes)
            if pending and first is None:
                first = time.perf_counter() - t0
            pending = True
    return time.perf_counter() - t0, audio, first


def _run_figures(seconds, audio_s, first, timer: Timer, foreign: float, cpu_s: float) -> dict:
    t = timer.seconds
    step, dvae, vocos = (statistics.median(t[k]) for k in ("step", "codes_to_mel", "mel_to_audio"))
    chunk_audio_s = CHUNK * audio_s / len(t["step"])  # one step per code
    return {"compute_s": seconds, "audio_s": audio_s, "rtf": seconds / audio_s, "first_audio_s": first,
            "steady_rtf": (CHUNK * step + dvae + vocos) / chunk_audio_s, "cpu_s_per_audio_s": cpu_s / audio_s,
            # the fastest of each stage: what an uncontended host gets, near enough, on a shared one
            "steady_rtf_fastest": (CHUNK * min(t["step"]) + min(t["codes_to_mel"]) + min(t["mel_to_audio"]))
            / chunk_audio_s, "step_ms_fastest": 1000 * min(t["step"]),
            "prefill_s": sum(t.get("prefill", [0])), "step_ms": 1000 * statistics.median(t["step"]),
            "dvae_ms_per_chunk": 1000 * statistics.median(t["codes_to_mel"]),
            "vocos_ms_per_chunk": 1000 * statistics.median(t["mel_to_audio"]), "foreign_cores": foreign}


def _median_runs(runs: list[dict]) -> dict:
    out = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0] if runs[0][k] is not None}
    out["runs"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs]
    return out


def markdown(results: list[dict], args) -> str:
    rows = ["| engine | RTF | steady RTF (median, fastest) | CPU s per audio s | other processes, cores | first audio s | prefill s | "
            "step ms | DVAE ms/chunk | Vocos ms/chunk | RSS loaded MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['engine']} | {r['rtf']:.3f} | {r['steady_rtf']:.3f}, {r['steady_rtf_fastest']:.3f} | "
                    f"{r['cpu_s_per_audio_s']:.2f} | "
                    f"{r['foreign_cores']:.1f} | "
                    f"{r['first_audio_s']:.2f} | {r['prefill_s']:.2f} | "
                    f"{r['step_ms']:.1f} | {r['dvae_ms_per_chunk']:.1f} | {r['vocos_ms_per_chunk']:.1f} | "
                    f"{r['rss_loaded_mb'] - r['rss_before_mb']} | {r['peak_rss_mb']} |")
    return "\n".join(rows)


def _spawn(engine: str, where: list[str], args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.speech", "--engine", engine, "--codes", str(args.codes),
           "--threads", str(args.threads), "--repeats", str(args.repeats), *where]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    log.info("%s: RTF %.3f, first audio %.2f s", out["engine"], out["rtf"], out["first_audio_s"])
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="checkpoint the bundle was exported from (the torch engine)")
    ap.add_argument("--bundle", type=Path, help="an exported bundle with speech instead of exporting the graphs")
    ap.add_argument("--precisions", default="int8,fp32", help="TTS decoder precisions to export and run")
    ap.add_argument("--codes", type=int, default=250, help="codes per run (250 = 5.3 s of audio)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engine", choices=["onnx", "torch"], help="run one engine in this process (JSON out)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    setup_logging()
    if args.engine == "onnx":
        print(json.dumps(run_onnx(args.bundle, args.codes, args.threads, args.repeats)))
        return
    if args.engine == "torch":
        print(json.dumps(run_torch(args.checkpoint, args.codes, args.threads, args.repeats)))
        return
    import tempfile

    jobs = []
    with tempfile.TemporaryDirectory(prefix="speech-bench-") as tmp:
        if args.bundle is not None:
            jobs.append(("onnx", ["--bundle", str(args.bundle)]))
        else:
            for precision in args.precisions.split(","):
                t0 = time.perf_counter()
                export_speech(args.checkpoint, Path(tmp) / precision, precision)
                log.info("exported the %s speech graphs in %.1f s", precision, time.perf_counter() - t0)
                jobs.append(("onnx", ["--bundle", str(Path(tmp) / precision)]))
        jobs.append(("torch", ["--checkpoint", str(args.checkpoint)]))
        results = [_spawn(engine, where, args) for engine, where in jobs]
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
