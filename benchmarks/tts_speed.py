"""The speech model's speed at the real shapes (MiniCPM-o 2.6's TTS Llama 768 x 20 layers, DVAE,
Vocos 512 x 8): ours at each --tts-precision against the PyTorch fp32 reference (export/reference/tts.py)
on the same random weights, one process, 2 threads.

    python -m benchmarks.tts_speed [--work DIR] [--precisions int8,fp32] [--threads 2] [--steps 100]

Prints JSON: per engine (each measured on its own, one after the other) the condition prefill
(302 positions), the median decode step, DVAE and
Vocos for one upstream streaming chunk (25 code frames = 50 mel frames = 0.533 s of audio), the
real-time factor of the model parts (compute seconds per second of audio: 46.875 code frames per
second) and the time to the first chunk (prefill + 25 steps + DVAE + Vocos), plus the bundle's
speech files and the process's RSS growth when loading them; then one code step of every engine
measured in turns (`interleaved_step_ms`, 15 rounds), the figure to compare on a shared host.
Sampling and the speech loop are not included. Speed does not depend on the weights' values, only their shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import peak_rss_bytes, setup_logging

log = logging.getLogger("benchmarks.tts_speed")
CODE_FRAMES_PER_S = 24000 / 256 / 2  # a code frame is 2 mel frames of 256 samples
CHUNK = 25  # upstream's output_chunk_size


class _RealShapes:
    """A checkpoint stand-in: the real tts.* table, values as the synthetic checkpoints draw them."""

    def __init__(self, folder: Path, seed: int = 0):
        from minicpmo.export.synth_tts import write_chattts_tokenizer, write_vocos
        from minicpmo.export.tts_config import TTSConfig
        from minicpmo.export.tts_tensors import DVAESizes, VocosSizes, tts_tensors

        self.folder, self.seed, self.cfg = folder, seed, TTSConfig(llm_dim=3584)
        self.shapes = tts_tensors(self.cfg, DVAESizes())
        if not (folder / "assets").is_dir():
            write_chattts_tokenizer(folder)
            write_vocos(folder / "assets" / "Vocos.pt", VocosSizes(), seed)

    def tts_config(self):
        return self.cfg

    def keys(self):
        return list(self.shapes)

    def read(self, name: str) -> np.ndarray:
        from minicpmo.export.synth import random_bf16

        bits = np.concatenate(list(random_bf16(name, self.shapes[name], self.seed)))
        return np.left_shift(bits.astype(np.uint32), 16).view(np.float32).reshape(self.shapes[name])


def build(work: Path, precision: str):
    """The speech files at one precision (kept for reuse) and a TTSModel over them."""
    from minicpmo.export.bundle import _graph_io
    from minicpmo.export.bundle_speech import write_speech
    from minicpmo.export.options import ExportOptions
    from minicpmo.runtime.manifest import Manifest

    folder = work / f"speech-{precision}"
    folder.mkdir(parents=True, exist_ok=True)
    section = folder / "speech.json"
    if not section.is_file():
        t0 = time.perf_counter()
        speech = write_speech(_RealShapes(work), folder, ExportOptions(tts_precision=precision), _graph_io,
                              lambda *a: None)
        section.write_text(json.dumps(speech), encoding="utf-8")
        log.info("built the %s speech graphs in %.0f s", precision, time.perf_counter() - t0)
    return Manifest(folder, {"speech": json.loads(section.read_text(encoding="utf-8"))})


def _median_s(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ours(manifest, threads: int, steps: int, rounds: int) -> dict:
    from minicpmo.runtime.tts_model import TTSModel

    rss0 = peak_rss_bytes()
    model = TTSModel.load(manifest, threads=threads)
    rss = peak_rss_bytes() - rss0
    ids, mask = model.text_input("the quick brown fox jumps over the lazy dog " * 5)
    spk = model.speaker_embedding(np.random.default_rng(0).standard_normal(model.cfg.llm_dim))
    prefill = _median_s(lambda: model.prefill(ids, spk, mask, chunk_size=None), rounds)  # one pass
    model.prefill(ids, spk, mask, chunk_size=None)
    codes, step_s = None, []
    for _ in range(steps):
        t0 = time.perf_counter()
        codes = model.step(codes).argmax(-1) % 625
        step_s.append(time.perf_counter() - t0)
    chunk = np.random.default_rng(1).integers(0, 625, (CHUNK, 4))
    dvae = _median_s(lambda: model.codes_to_mel(chunk), rounds)
    mel = model.codes_to_mel(chunk)
    vocos = _median_s(lambda: model.mel_to_audio(mel), rounds)
    files = sum(manifest.path(manifest["speech"][k]["file"] + ext).stat().st_size
                for k in ("decoder", "dvae", "vocos") for ext in ("", ".data"))
    files += manifest.path(manifest["speech"]["tables"]["file"]).stat().st_size
    return _summary(prefill, statistics.median(step_s[1:]), dvae, vocos) | {
        "rss_growth_bytes_on_load": rss, "kv_cache_bytes": model.kv.nbytes, "graph_files_bytes": files}


def measure_reference(threads: int, steps: int, rounds: int, work: Path) -> dict:
    """The same measurements of export/reference/tts.py (eager fp32; the condition prefilled once)."""
    import torch

    from minicpmo.export.reference import tts as R
    from minicpmo.export.torch_zip import load_state_dict

    torch.set_num_threads(threads)
    src = _RealShapes(work)
    w = {k: torch.from_numpy(src.read(k)) for k in src.keys() if not k.startswith("tts.model.embed_tokens")}
    vocos = {k: torch.from_numpy(v) for k, v in load_state_dict(work / "assets" / "Vocos.pt").items()}
    cfg = src.cfg
    ids = torch.tensor([21131, 21143] + [300] * 60 + [21133] + [0] * 239 + [21132])
    mask = (ids != 0).to(torch.int8)
    spk = R.speaker_embedding(w, torch.randn(cfg.llm_dim))
    with torch.no_grad():
        prefill = _median_s(lambda: R.condition_cache(w, cfg, ids, spk), 1)
        cache = R.condition_cache(w, cfg, ids, spk)
        x = torch.nn.functional.embedding(torch.tensor([[cfg.audio_bos_token_id]]), w["tts.emb_text.weight"])
        step_s = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits, cache = R.tts_forward(w, cfg, x, cache, R.generation_bias(cfg, cache[0][0].shape[2], mask))
            x = R.code_embeds(w, cfg, (logits[0, -1].argmax(-1) % 625).view(1, -1))
            step_s.append(time.perf_counter() - t0)
        codes = torch.randint(0, 625, (1, 4, CHUNK))
        dvae = _median_s(lambda: R.dvae_decode(w, codes), rounds)
        mel = R.dvae_decode(w, codes)
        voc = _median_s(lambda: R.vocos_decode(vocos, mel), rounds)
    return _summary(prefill, statistics.median(step_s[1:]), dvae, voc)


def interleaved_steps(manifests: dict, threads: int, rounds: int, work: Path) -> dict[str, float]:
    """Median ms of one code step per engine, the engines stepping in turns (round-robin) so that load
    from other processes hits them alike: the ratio to trust on a shared host."""
    import torch

    from minicpmo.export.reference import tts as R
    from minicpmo.runtime.tts_model import TTSModel

    torch.set_num_threads(threads)
    models = {f"ours {p}": TTSModel.load(m, threads=threads) for p, m in manifests.items()}
    ids, mask = next(iter(models.values())).text_input("the quick brown fox jumps over the lazy dog " * 5)
    for m in models.values():
        m.prefill(ids, m.speaker_embedding(np.ones(m.cfg.llm_dim, np.float32)), mask)
        m.step(None)
    src = _RealShapes(work)
    w = {k: torch.from_numpy(src.read(k)) for k in src.keys() if k.startswith(("tts.model.layers", "tts.model.norm",
                                                                                  "tts.head_code"))}
    heads, dim = src.cfg.num_attention_heads, src.cfg.head_dim
    cache = [(torch.zeros(1, heads, 303, dim), torch.zeros(1, heads, 303, dim)) for _ in range(src.cfg.num_hidden_layers)]
    bias, x = R.generation_bias(src.cfg, 303, torch.from_numpy(mask)), torch.randn(1, 1, src.cfg.hidden_size)
    engines = {name: (lambda m=m: m.step(np.zeros(4, np.int64))) for name, m in models.items()}
    engines["PyTorch fp32 reference"] = lambda: R.tts_forward(w, src.cfg, x, cache, bias)
    times: dict[str, list[float]] = {name: [] for name in engines}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in engines.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}


def _summary(prefill: float, step: float, dvae: float, vocos: float) -> dict:
    chunk_audio_s = CHUNK / CODE_FRAMES_PER_S
    rtf = step * CODE_FRAMES_PER_S + (dvae + vocos) / chunk_audio_s
    return {"prefill_s": round(prefill, 4), "step_ms": round(step * 1e3, 2), "dvae_chunk_ms": round(dvae * 1e3, 1),
            "vocos_chunk_ms": round(vocos * 1e3, 1), "rtf_model": round(rtf, 3),
            "first_chunk_s": round(prefill + CHUNK * step + dvae + vocos, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tts_speed", description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("models/bench-tts"))
    p.add_argument("--precisions", default="int8,fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    args.work.mkdir(parents=True, exist_ok=True)
    manifests = {prec: build(args.work, prec) for prec in args.precisions.split(",")}
    rows = {f"ours {prec}": measure_ours(m, args.threads, args.steps, args.rounds) for prec, m in manifests.items()}
    if not args.no_reference:
        # the reference is ~15x slower: fewer steps (the median of 20 is as stable) and one round
        rows["PyTorch fp32 reference"] = measure_reference(args.threads, min(args.steps, 20), 1, args.work)
    steps = interleaved_steps(manifests, args.threads, 15, args.work) if not args.no_reference else None
    json.dump({"threads": args.threads, "steps": args.steps, "rows": rows, "interleaved_step_ms": steps},
              sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
