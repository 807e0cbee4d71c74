"""Progress on stderr for long work (export): one line per stage, rewritten in place on a TTY.

    [   0.4s] vision: done
    [   3.1s] decoder: 12/28 layers
    [  41.0s] hashing: 3/6 files
"""

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

    def __call__(self, stage: str, done: int, total: int, unit: str = "") -> None:
        """`unit` names what is counted ("layers"); a one-step stage without one shows running/done."""
        if unit or total != 1:
            state = f"{done}/{total}{' ' + unit if unit else ''}"
        else:
            state = "done" if done else "running"
        line = f"[{time.time() - self.t0:7.1f}s] {stage}: {state}"
        if self.tty:
            end = "\n" if stage != self._last_stage and self._last_stage else ""
            self.stream.write(f"{end}\r{line}\033[K")  # \033[K: clear what a longer line left
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_stage = stage
