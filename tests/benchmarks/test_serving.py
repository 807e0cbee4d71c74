"""benchmarks/serving.py: what the figures count, on made-up token times (nothing here is timed),
and that every server's rows are measured in each round, in alternating order."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/

import benchmarks.serving as serving  # noqa: E402


def test_aggregate_counts_only_the_tokens_while_every_stream_decodes():
    # stream A: first token at 1.0, then one every 0.1 s to 2.0; stream B starts at 1.5 and ends at 3.0
    a = [1.0 + 0.1 * i for i in range(11)]
    b = [1.5 + 0.1 * i for i in range(16)]
    row = serving.summarize([(0.0, a), (0.0, b)], foreign_cores=0.25)
    # together from 1.5 (B's first) to 2.0 (A's last): A's 1.6..2.0 (5) and B's 1.6..2.0 (5) over 0.5 s
    assert row["aggregate_decode_tok_s"] == pytest.approx(20.0, rel=0.02)
    assert row["tpot_p50_ms"] == pytest.approx(100.0, abs=0.5)
    assert row["ttft_p50_s"] == pytest.approx(1.25)
    assert row["tokens"] == 27 and row["streams"] == 2
    assert row["output_tok_s"] == pytest.approx(27 / 3.0, rel=0.01)


def test_streams_that_never_overlap_have_no_aggregate():
    row = serving.summarize([(0.0, [1.0, 1.1, 1.2]), (0.0, [2.0, 2.1, 2.2])], foreign_cores=0.0)
    assert row["aggregate_decode_tok_s"] is None


class FakeServer:
    def __init__(self, name):
        self.name = name


def test_each_round_measures_every_server_in_alternating_order(monkeypatch):
    order = []

    def fake_run(server, contents, max_tokens):
        order.append((server.name, len(contents)))
        return {"aggregate_decode_tok_s": float(len(contents)), "tpot_p50_ms": 10.0 * len(order)}

    monkeypatch.setattr(serving, "run_clients", fake_run)
    ours, peer = FakeServer("ours"), FakeServer("peer")
    rows = serving.measure([(ours, None, [1, 4]), (peer, None, [1, 4])], [f"p{i}" for i in range(40)],
                           max_tokens=8, rounds=2)
    warm, measured = order[:2], order[2:]
    assert warm == [("ours", 1), ("peer", 1)]
    assert measured[:4] == [("ours", 1), ("ours", 4), ("peer", 1), ("peer", 4)]
    assert measured[4:] == measured[:4][::-1]
    assert [(r["server"], r["clients"], r["rounds"]) for r in rows] == [
        ("ours", 1, 2), ("ours", 4, 2), ("peer", 1, 2), ("peer", 4, 2)]
    # each figure is the median over that row's rounds: ours' 1-client runs were the 3rd and 10th calls
    assert rows[0]["tpot_p50_ms"] == pytest.approx((30.0 + 100.0) / 2)
