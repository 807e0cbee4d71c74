"""Compare two runs of tests/emulated_cpu.py (this host and an emulated arm64): print what differs and
exit 1 when a bound fails. The bounds are those tests/export/test_int8_portable.py holds between
x86 CPU kinds.

    python tests/arm64/compare.py HOST.npz ARM64.npz
"""

from __future__ import annotations

import sys

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def main(host_path: str, arm_path: str) -> int:
    host, arm = np.load(host_path), np.load(arm_path)
    failures = []
    for key, bound in (("vision", 0.9995), ("text_logits", 0.999), ("logits", 0.999)):
        cos = cosine(host[key], arm[key])
        rel = float(np.abs(host[key] - arm[key]).max() / np.abs(host[key]).max())
        print(f"{key}: cosine {cos:.7f}, max |diff| {rel:.2e} of the largest value")
        if cos < bound:
            failures.append(f"{key} cosine {cos:.6f} < {bound}")
    g_host, g_arm = host["greedy"].tolist(), arm["greedy"].tolist()
    same = next((i for i, (x, y) in enumerate(zip(g_host, g_arm, strict=True)) if x != y), len(g_host))
    print(f"greedy: {same} of {len(g_host)} tokens identical before the first difference")
    if same < len(g_host):
        failures.append(f"greedy ids differ from token {same}")
    for f in failures:
        print(f"FAIL: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
