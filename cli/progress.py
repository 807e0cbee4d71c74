"""Progress on stderr for long work (export): one line per stage, rewritten in place on a TTY."""

from __future__ import annotations

import sys
import time


class ProgressPrinter:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.time()
        self._last_stage = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.tty and self._last_stage:
            self.stream.write("\n")
        return False

    def __call__(self, stage: str, done: int, total: int) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {stage}: {done}/{total}"
        if self.tty:
            end = "\n" if stage != self._last_stage and self._last_stage else ""
            self.stream.write(f"{end}\r{line}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_stage = stage
