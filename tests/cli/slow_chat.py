"""`minicpmo` with every decoder run slowed down, so that a test can press Ctrl-C while a prefill or a
reply is running. The delays (seconds) are read before each run from the JSON file named by
$SLOW_CHAT_DELAYS: {"prefill": s, "step": s}; a missing file means no delay."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from minicpmo.cli.main import cli
from minicpmo.runtime.generate import Decoder

_run = Decoder._run


def _delays() -> dict:
    try:
        return json.loads(Path(os.environ["SLOW_CHAT_DELAYS"]).read_text())
    except (KeyError, OSError, ValueError):
        return {}


def slow_run(self, embeds, keys):
    delays = _delays()
    time.sleep(delays.get("prefill", 0.0) if embeds.shape[0] > 1 else delays.get("step", 0.0))
    return _run(self, embeds, keys)


if __name__ == "__main__":
    Decoder._run = slow_run
    sys.exit(cli(prog_name="minicpmo"))
