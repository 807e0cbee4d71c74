"""Stop strings over streamed text: emit only what can no longer turn into a stop string."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import InputError


class StopMatcher:
    """Feed text pieces; get back the part that is safe to show and whether a stop string was hit.

    A tail that could be the start of a stop string is held back until the next piece settles it. On a
    match the text before the stop string is emitted and the stop string itself is dropped.
    """

    def __init__(self, stop_strings: Iterable[str] = ()):
        stops = list(stop_strings)
        for i, s in enumerate(stops):
            if not isinstance(s, str) or not s:
                raise InputError(f"stop[{i}] must be a non-empty string", param="stop")
        self.stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a piece; return (text safe to emit, whether a stop string has been reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buffer[:cut], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation: release the held-back tail (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:k]):
                    best = k
                    break
        return best
