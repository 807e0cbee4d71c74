"""Vision encoder + resampler, one process: ours at each vision precision against the PyTorch fp32
reference (export/reference), interleaved in rounds on the same images and threads.

    python -m benchmarks.vision CKPT [--work DIR] [--precisions fp32,int8,fp16] [--threads 2] [--rounds 3]

Prints, per engine: seconds per 448x448 slice (preprocessing included, median over rounds), the ratio
of the reference's time to it, and the minimum per-slice cosine of the resampled embeddings against
our fp32 graph and against the reference, for a one-slice image and a 7-slice 1344x896 image.
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

from .common import setup_logging

log = logging.getLogger("benchmarks.vision")


def _test_image(width: int, height: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)  # smooth, photo-like


def build_graphs(ckpt, precisions: list[str], work: Path) -> dict[str, Path]:
    """One vision graph per precision, written the way `minicpmo export` writes it (kept for reuse)."""
    from minicpmo.export.bundle import write_encoder
    from minicpmo.export.options import ExportOptions
    from minicpmo.export.vision import build_vision_graph

    paths = {}
    for prec in precisions:
        folder = work / f"vision-{prec}"
        paths[prec] = folder / "vision.onnx"
        if paths[prec].is_file():
            log.info("reusing %s", paths[prec])
            continue
        folder.mkdir(parents=True, exist_ok=True)
        opts = ExportOptions(vision_precision=prec)
        t0 = time.perf_counter()
        write_encoder(folder, "vision", opts, lambda g, p, o=opts: build_vision_graph(
            g, ckpt.config, ckpt.read, p, o.block_size, o.accuracy_level))
        log.info("built vision %s in %.0f s", prec, time.perf_counter() - t0)
    return paths


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def run(ckpt_dir: Path, work: Path, precisions: list[str], threads: int, rounds: int) -> dict:
    import torch

    from minicpmo.export.bundle import preprocessing_constants
    from minicpmo.export.checkpoint import open_checkpoint
    from minicpmo.export.reference import reference_image_embeds
    from minicpmo.runtime.preprocess.image import SlicingParams
    from minicpmo.runtime.sessions import create_session
    from minicpmo.runtime.vision import VisionEncoder

    torch.set_num_threads(threads)
    ckpt = open_checkpoint(ckpt_dir)
    cfg = ckpt.config
    params = SlicingParams.from_dict(preprocessing_constants(cfg))
    graphs = build_graphs(ckpt, precisions, work)
    weights = {k: torch.from_numpy(ckpt.read(k)) for k in ckpt.keys() if k.startswith(("vpm.", "resampler."))}
    encoders = {p: VisionEncoder(create_session(path, "cpu", threads, memory_arena=False), params)
                for p, path in graphs.items()}
    one, seven = _test_image(448, 448, 0), _test_image(1344, 896, 1)

    def ours(p, img):
        enc = encoders[p]
        enc.cache.clear()
        return enc.encode(enc.prepare(img))

    def reference(img):
        with torch.no_grad():
            return reference_image_embeds(weights, cfg, [img]).numpy()

    engines = {f"ours {p}": (lambda img, p=p: ours(p, img)) for p in precisions}
    engines["PyTorch fp32 reference"] = reference
    for fn in engines.values():  # warm-up
        fn(one)
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            engines[name](one)
            times[name].append(time.perf_counter() - t0)
            log.info("round %d %s: %.3f s", r + 1, name, times[name][-1])
    outputs = {name: (fn(one), fn(seven)) for name, fn in engines.items()}
    ref_s = statistics.median(times["PyTorch fp32 reference"])
    rows = []
    for name in names:
        s = statistics.median(times[name])
        row = {"engine": name, "seconds_per_slice": round(s, 3), "reference_over_this": round(ref_s / s, 2),
               "rounds": [round(t, 3) for t in times[name]]}
        for against in ("ours fp32", "PyTorch fp32 reference"):
            if against in outputs and against != name:
                row[f"min_cosine_vs_{against}"] = [round(_min_cosine(outputs[name][i], outputs[against][i]), 5)
                                                   for i in (0, 1)]
        rows.append(row)
    return {"threads": threads, "rounds": rounds, "slices": [1, len(outputs[names[0]][1])], "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vision", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--work", type=Path, help="where the vision graphs go [/tmp/minicpmo-vision/NAME]")
    p.add_argument("--precisions", default="fp32,int8,fp16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    setup_logging()
    work = a.work or Path("/tmp/minicpmo-vision") / a.checkpoint.resolve().name
    res = run(a.checkpoint, work, a.precisions.split(","), a.threads, a.rounds)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print("| engine | s per 448² slice | reference / this | min cosine vs ours fp32 (1 / 7 slices) "
          "| min cosine vs reference |\n|---|---|---|---|---|")
    for r in res["rows"]:
        c1 = r.get("min_cosine_vs_ours fp32", "-")
        c2 = r.get("min_cosine_vs_PyTorch fp32 reference", "-")
        print(f"| {r['engine']} | {r['seconds_per_slice']} | {r['reference_over_this']}x | {c1} | {c2} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
