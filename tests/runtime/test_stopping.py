"""Stop strings over streamed text (runtime/stopping.py)."""

from __future__ import annotations

import random

import pytest

from minicpmo.runtime.errors import InputError
from minicpmo.runtime.stopping import StopMatcher


def run(stops, pieces) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    out, emitted = [], []
    stopped = False
    for p in pieces:
        text, stopped = m.feed(p)
        emitted.append(text)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, emitted


def test_no_stops_passes_text_through():
    assert run([], ["a", "b"]) == ("ab", False, ["a", "b"])


def test_stop_within_one_piece():
    assert run(["END"], ["hello END world"])[:2] == ("hello ", True)


def test_stop_split_across_pieces_is_held_then_dropped():
    text, stopped, emitted = run(["</answer>"], ["The answer is 4.", "</ans", "wer> ignored"])
    assert (text, stopped) == ("The answer is 4.", True)
    assert emitted == ["The answer is 4.", "", ""]


def test_false_start_is_released():
    text, stopped, emitted = run(["STOP"], ["go ST", "ILL", " on"])
    assert (text, stopped) == ("go STILL on", False)
    assert emitted == ["go ", "STILL", " on"]


def test_held_tail_comes_out_on_flush():
    m = StopMatcher(["\n\n"])
    assert m.feed("line\n") == ("line", False)
    assert m.flush() == "\n"


def test_earliest_of_several_stops_wins():
    assert run(["world", "lo w"], ["hello world"])[:2] == ("hel", True)


def test_overlapping_prefixes():
    # "aab" must be found although the held "aa" first looked like a start of it at another offset
    assert run(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", True)


def test_after_stop_everything_is_swallowed():
    m = StopMatcher(["x"])
    assert m.feed("ax") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_random_splits_match_whole_text_search():
    rng = random.Random(0)
    alphabet = "ab\n<>/"
    stops = ["</a>", "\n\n", "bbb"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = (text[: min(hits)], True) if hits else (text, False)
        assert run(stops, pieces)[:2] == expected, (text, pieces)


@pytest.mark.parametrize("bad", [[""], [None], ["ok", ""]])
def test_bad_stop_strings(bad):
    with pytest.raises(InputError) as info:
        StopMatcher(bad)
    assert info.value.param == "stop"
