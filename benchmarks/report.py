"""The peers table: ceilings, ratios against ours, and the Markdown rendering."""

from __future__ import annotations

import statistics

from .common import Protocol


def merge_rounds(rows: list[dict]) -> dict:
    """One row per peer from its rounds: median speeds, highest peak RSS, every round kept."""
    ok = [r for r in rows if "decode_tok_s" in r]
    if not ok:
        return rows[-1]
    out = dict(ok[0])
    for key in ("prefill_tok_s", "decode_tok_s"):
        out[key] = round(statistics.median(r[key] for r in ok), 2)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    probes = [r["bandwidth_probe"]["best_bytes_per_s"] for r in ok if "bandwidth_probe" in r]
    if probes:
        out["bandwidth_probe"] = {"best_bytes_per_s": statistics.median(probes)}
    out["rounds"] = [{k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s", "prefill_seconds", "decode_seconds",
                                            "foreign_load_cores", "busy_retries", "bandwidth_probe")} for r in rows]
    return out


def add_ratios(rows: list[dict], bandwidth: float | None, proto: Protocol) -> None:
    """Add decode ceiling, % of ceiling and ours/peer ratios to the measured rows (in place).

    The ceiling uses the run's bandwidth (2 GiB, at the start). Each row also carries small probes
    taken before and after its measurement (`bandwidth_probe`): they swing too much (40-74 GB/s
    on this shared host) to serve as its ceiling, but they show when the machine was in a slow phase."""
    for r in rows:
        bw = bandwidth
        if "decode_tok_s" not in r or not bw or not r.get("weight_bytes_per_token"):
            continue
        kv = r.get("kv_bytes_per_position", 0) * proto.mean_decode_length
        r["bytes_per_token"] = int(r["weight_bytes_per_token"] + kv)
        r["ceiling_tok_s"] = round(bw / r["bytes_per_token"], 2)
        r["decode_pct_of_ceiling"] = round(100 * r["decode_tok_s"] / r["ceiling_tok_s"], 1)
    ours = next((r for r in rows if r["family"] == "ours" and "decode_tok_s" in r), None)
    if ours is None:
        return
    for r in rows:
        if "decode_tok_s" in r:
            r["ours_over_peer_prefill"] = round(ours["prefill_tok_s"] / r["prefill_tok_s"], 2)
            r["ours_over_peer_decode"] = round(ours["decode_tok_s"] / r["decode_tok_s"], 2)


def _gb(n) -> str:
    return f"{n / 1e9:.2f} GB" if n else "-"


def _row(r: dict) -> str:
    if "decode_tok_s" not in r:
        why = r.get("skipped") and f"skipped: {r['skipped']}" or r.get("error", "not run")
        return f"| {r['label']} | {why} | | | | | | | |"
    prep = r.get("prepare", {})
    prep_s = f"{prep['seconds']:.0f} s / {_gb(prep.get('peak_rss_bytes'))}" if prep.get("seconds") else "-"
    pct = f"{r['decode_pct_of_ceiling']:.0f}% of {r['ceiling_tok_s']:.1f}" if "ceiling_tok_s" in r else "-"
    return (f"| {r['label']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {pct} | "
            f"{_gb(r.get('peak_rss_bytes'))} | {_gb(r.get('file_bytes'))} | "
            f"{r.get('ours_over_peer_prefill', '-')} | {r.get('ours_over_peer_decode', '-')} | {prep_s} |")


def markdown_table(result: dict) -> str:
    p, d, bw = result["protocol"], result["dims"], result["bandwidth"]
    rounds = result.get("rounds", 1)
    lines = [
        f"LLM: {d['num_layers']} layers, hidden {d['hidden_size']}, ffn {d['intermediate_size']}, "
        f"vocab {d['vocab_size']} ({d['llm_params'] / 1e9:.2f}e9 parameters); {p['threads']} threads; "
        f"prefill {p['prompt_tokens']} tokens, then decode {p['decode_tokens']} tokens; "
        f"medians of {p['repeats']} repeats" + (f" x {rounds} rounds (alternating order)." if rounds > 1 else "."),
        f"Read bandwidth ({bw.get('threads')} threads): best {bw.get('best_bytes_per_s', 0) / 1e9:.1f} GB/s, "
        f"median {bw.get('median_bytes_per_s', 0) / 1e9:.1f} GB/s, measured at the start; the ceilings use the best.",
        "",
        "| peer | prefill tok/s | decode tok/s | decode % of its ceiling (tok/s) | peak RSS | file size "
        "| prefill ours/peer | decode ours/peer | prepare time / peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_row(r) for r in result["rows"]],
    ]
    inter = result.get("interleaved")
    if inter:
        from .interleaved import markdown

        lines += ["", markdown(inter) if "summary" in inter else
                  f"Interleaved pass: {inter.get('skipped') or inter.get('error')}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.report RESULTS.json`: the table of a saved `peers --json` run."""
    import json
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report RESULTS.json", file=sys.stderr)
        return 2
    result = json.loads(Path(args[0]).read_text())
    add_ratios(result["rows"], result["bandwidth"].get("best_bytes_per_s"), Protocol(**result["protocol"]))
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
