#!/usr/bin/env bash
# `make test-arm64`: the runtime-only package on an emulated arm64 Debian, against this host's run.
#
# 1. Debian's debootstrap builds a bookworm arm64 root (python3, venv, pip), once, in $ARM64_ROOT.
# 2. Debian's qemu-user-static runs its binaries, through binfmt_misc (registered here if it is not;
#    this needs root, and changes the machine's binfmt table until reboot).
# 3. In that root: a venv with the package's base install only (onnxruntime, numpy, pillow,
#    tokenizers...: aarch64 wheels from the package index), pinned by constraints.txt. No torch, no
#    exporter extra.
# 4. On this host: a tiny synthetic checkpoint exported to an int4 bundle (the exporter is not needed
#    on the edge box: the bundle is the contract).
# 5. Both sides run tests/emulated_cpu.py's `outputs` (vision embeddings, first-token logits of a text
#    and an image prompt, 24 greedy tokens) and tests/arm64/compare.py prints what differs.
# Not in CI: the first run downloads ~250 MB and takes tens of minutes under emulation.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
ROOT=${ARM64_ROOT:-/var/tmp/minicpmo-arm64}
WORK=${ARM64_WORK:-/var/tmp/minicpmo-arm64-work}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY=${PYTHON:-$REPO/.venv/bin/python}
t_start=$(date +%s)
say() { echo "[test-arm64 $(( $(date +%s) - t_start ))s] $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "error: test-arm64 needs root (debootstrap, chroot, binfmt_misc)" >&2; exit 1; }
for tool in debootstrap qemu-aarch64-static; do
    command -v "$tool" >/dev/null || apt-get install -y -q debootstrap qemu-user-static >/dev/null
done
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    say "registering qemu-aarch64 with binfmt_misc"
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    say "debootstrap bookworm arm64 into $ROOT"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOT" "$MIRROR" >&2
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# /proc for the root (ONNX Runtime opens its external data through /proc/self/fd), unmounted on exit.
# No /sys: ONNX Runtime's cpuinfo then warns that it cannot read the CPU list (harmless: MLAS
# detects ARM features itself), while with the host's (x86) /sys it crashes under QEMU.
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
# This host's CA bundle (a proxy's certificate may be in it) and none of its pip settings: pip in the
# root reads only what is passed here.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }
say "arm64 root: $(in_root uname -m), $(in_root python3 --version)"

# The package's source as committed plus the working tree's changes (no venv, no models).
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$ROOT/src"
if [ ! -x "$ROOT/venv/bin/python" ]; then
    in_root python3 -m venv /venv
fi
say "installing the runtime-only package (aarch64 wheels)"
in_root /venv/bin/pip install -q -c /src/constraints.txt /src >&2
in_root /venv/bin/python -c "import onnxruntime, platform; print('arm64 venv: onnxruntime', \
onnxruntime.__version__, platform.machine())" >&2
if in_root /venv/bin/python -c "import torch" 2>/dev/null; then
    echo "error: torch is installed in the runtime-only venv" >&2; exit 1
fi

mkdir -p "$WORK"
if [ ! -f "$WORK/bundle/manifest.json" ]; then
    say "exporting a tiny int4 bundle on the host"
    rm -rf "$WORK/ckpt" "$WORK/bundle"
    "$(dirname "$PY")/minicpmo" synth "$WORK/ckpt" --size tiny --seed 0 >&2
    "$(dirname "$PY")/minicpmo" export "$WORK/ckpt" -o "$WORK/bundle" --no-audio >&2
fi
rm -rf "$ROOT/bundle" && cp -r "$WORK/bundle" "$ROOT/bundle"

say "host run ($(uname -m))"
"$PY" tests/emulated_cpu.py "$WORK/bundle" "$WORK/host.npz"
say "arm64 run (emulated)"
in_root /venv/bin/python /src/tests/emulated_cpu.py /bundle /arm64.npz
cp "$ROOT/arm64.npz" "$WORK/arm64.npz"
say "comparing"
"$PY" tests/arm64/compare.py "$WORK/host.npz" "$WORK/arm64.npz"
say "done"
