"""What the decoder's hidden_states output (speech's speaker condition) costs a run that does not
fetch it: the bundle's decoder as exported against the same graph with that output removed, both
sharing one weights file, in one process, in turns.

    python -m benchmarks.hidden_output BUNDLE [--rounds 5] [--prompt-tokens 512] [--decode-tokens 64]

Each round times, for each graph: a prefill of `--prompt-tokens` positions from an empty cache, then
`--decode-tokens` single-position steps. Medians over rounds; the ratio is with / without.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from .common import ForeignLoad, prompt_ids, setup_logging


def strip_hidden_output(bundle: Path) -> Path:
    """decoder.onnx without its hidden_states output (and the node that feeds it), next to it."""
    from minicpmo.export.decoder import IO

    model = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    keep = [o for o in model.graph.output if o.name != IO.hidden_states]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    nodes = [n for n in model.graph.node if IO.hidden_states not in n.output]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out = bundle / "decoder-no-hidden.onnx"
    onnx.save(model, str(out))
    return out


def _engine(manifest, path: Path | None, threads: int):
    from minicpmo.runtime.generate import Decoder
    from minicpmo.runtime.kv_cache import KVCache
    from minicpmo.runtime.sessions import create_session, load_resident_initializers

    dec = manifest["decoder"]
    session = create_session(path or manifest.path(dec["file"]), "cpu", threads,
                             initializers=load_resident_initializers(manifest))
    kv = KVCache(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], 2048, io_names=dec["io"])
    return Decoder(session, dec["io"], kv, dec["vocab_size"])


def _round(decoder, embed, ids, decode_tokens) -> tuple[float, float]:
    decoder.kv.reset()
    t0 = time.perf_counter()
    logits = decoder.prefill(embed(ids), ids.tolist())
    prefill = time.perf_counter() - t0
    token = int(np.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(np.argmax(decoder.forward(embed(np.array([token])), [token])))
    return prefill, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    setup_logging()
    from minicpmo.runtime.manifest import load_manifest
    from minicpmo.runtime.sessions import EmbeddingTable

    manifest = load_manifest(args.bundle)
    emb = manifest["embeddings"]
    embed = EmbeddingTable(manifest.path(emb["file"]), emb["dtype"], emb["shape"])
    engines = {"with": _engine(manifest, None, args.threads),
               "without": _engine(manifest, strip_hidden_output(args.bundle), args.threads)}
    ids = prompt_ids(args.prompt_tokens, manifest["decoder"]["vocab_size"])
    times = {k: ([], []) for k in engines}
    with ForeignLoad() as load:
        for _ in range(args.rounds):
            for name, d in engines.items():
                p, s = _round(d, embed, ids, args.decode_tokens)
                times[name][0].append(p)
                times[name][1].append(s)
    med = {k: (statistics.median(p), statistics.median(s)) for k, (p, s) in times.items()}
    print(json.dumps({"prefill_s": {k: round(v[0], 3) for k, v in med.items()},
                      "decode_ms_per_step": {k: round(1000 * v[1] / args.decode_tokens, 2) for k, v in med.items()},
                      "prefill_ratio": round(med["with"][0] / med["without"][0], 3),
                      "decode_ratio": round(med["with"][1] / med["without"][1], 3),
                      "rounds": args.rounds, "foreign_cores": round(load.cores, 2)}))


if __name__ == "__main__":
    main()
