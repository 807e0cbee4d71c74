"""benchmarks/interleaved.py: the per-cycle ratio cancels a host whose speed drifts, where the
ratio of whole-run medians does not. Fake engines on a fake clock: nothing here is timed."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: benchmarks/

from benchmarks.common import Protocol  # noqa: E402
from benchmarks.interleaved import interleave, markdown, summarize  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def slowdown(self) -> float:
        # the host halves its speed for the second half of the run: a drift over minutes
        return 1.0 if self.now < 60.0 else 2.0


class FakeEngine:
    def __init__(self, name: str, step_s: float, prefill_s: float, clock: FakeClock):
        self.name, self.step_s, self.prefill_s, self.clock = name, step_s, prefill_s, clock
        self.steps = self.prefills = 0

    def prefill(self):
        self.prefills += 1
        self.clock.now += self.prefill_s * self.clock.slowdown()

    def step(self):
        self.steps += 1
        self.clock.now += self.step_s * self.clock.slowdown()


def test_per_cycle_ratio_cancels_drift():
    clock = FakeClock()
    ours = FakeEngine("ours", 0.10, 5.0, clock)
    peer = FakeEngine("peer", 0.14, 7.0, clock)
    proto = Protocol(prompt_tokens=512, decode_tokens=65, repeats=1, threads=2)
    res = interleave([peer, ours], proto, rounds=4, chunk=16, clock=clock)
    # every engine decodes decode_tokens - 1 steps per round (the first token is the prefill's)
    assert ours.steps == peer.steps == 4 * 64
    assert ours.prefills == peer.prefills == 4
    assert len(res["chunks"]) == 4 * 4
    table = summarize(res, proto, ["peer", "ours"])
    assert table["ours"]["ratios"]["peer"]["decode_median"] == pytest.approx(1.4)
    assert table["ours"]["ratios"]["peer"]["decode_p10"] == pytest.approx(1.4)
    assert table["ours"]["ratios"]["peer"]["prefill_median"] == pytest.approx(1.4)
    assert table["peer"]["ratios"]["ours"]["decode_median"] == pytest.approx(1 / 1.4, abs=1e-3)
    # the drift is there: the two halves of the run see different speeds
    per_token = sorted(c["ours"] for c in res["chunks"])
    assert per_token[0] == pytest.approx(0.10) and per_token[-1] == pytest.approx(0.20)
    assert "ours" in markdown({"started": "a", "finished": "b", "rounds": 4, "chunk": 16, "peers": ["peer"],
                               "ours": ["ours"], "summary": table})


def test_turn_order_rotates():
    clock = FakeClock()
    order = []

    class Recording(FakeEngine):
        def step(self):
            if not order or order[-1] != self.name:
                order.append(self.name)
            super().step()

    engines = [Recording(n, 0.1, 1.0, clock) for n in ("a", "b", "c")]
    interleave(engines, Protocol(16, 49, 1, 2), rounds=1, chunk=16, clock=clock)
    turns = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert [t[0] for t in turns] == ["a", "b", "c"]  # a different engine opens each cycle
