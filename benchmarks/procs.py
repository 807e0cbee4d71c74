"""Child processes: each peer runs alone in its own process so that its peak RSS is its own.

The peak comes from os.wait4's rusage of that child (Linux ru_maxrss, KiB). The parent stays
small (no numpy/onnxruntime/torch imports) because a child's ru_maxrss may include what it
inherited at fork before exec.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("benchmarks.procs")
REPO = Path(__file__).resolve().parents[1]
TAIL_CHARS = 4000


def run_child(cmd: list[str], *, timeout_s: float | None = None, quiet: bool = False) -> dict:
    """Run cmd to the end; {"returncode", "seconds", "peak_rss_bytes", "output_tail"}.

    quiet: capture stdout+stderr (kept: the last TAIL_CHARS) instead of passing stderr through."""
    with tempfile.TemporaryFile("w+b") as sink:
        out = sink if quiet else subprocess.DEVNULL
        err = subprocess.STDOUT if quiet else None
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err)
        status, usage = _wait(proc, timeout_s)
        seconds = time.perf_counter() - t0
        tail = ""
        if quiet:
            sink.seek(max(0, sink.seek(0, 2) - TAIL_CHARS))
            tail = sink.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    return {"returncode": code, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "output_tail": tail}


def _wait(proc: subprocess.Popen, timeout_s: float | None):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if time.monotonic() > deadline:
            log.warning("child %d ran past %.0f s: killing it", proc.pid, timeout_s)
            proc.kill()
            deadline = None
        time.sleep(0.2)


def run_worker(step: str, args: dict, *, timeout_s: float | None = None) -> dict:
    """Run `python -m benchmarks.worker STEP ARGS OUT` in its own process; its JSON result, plus
    "process" (the child's own seconds and peak RSS) or "error" when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", step, json.dumps(args), str(out)]
        res = run_child(cmd, timeout_s=timeout_s)
        result = json.loads(out.read_text()) if out.is_file() else {}
    result["process"] = {k: res[k] for k in ("returncode", "seconds", "peak_rss_bytes")}
    if res["returncode"] != 0 and "error" not in result:
        result["error"] = (f"killed by signal {-res['returncode']} (out of memory?)" if res["returncode"] < 0
                           else f"exit code {res['returncode']}")
    return result
