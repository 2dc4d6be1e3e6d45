#!/usr/bin/env bash
# What the TVM engine's ARM path needs beyond pip, from Debian's packages: the aarch64 cross
# compiler that links `qpass compile --engine tvm --target tvm-arm` libraries, and an aarch64
# Python with TVM run under qemu-user, so tests can load and run those libraries through a TVM
# RPC server on this x86_64 host. Idempotent (a quick no-op once done); tools/setup_tests.sh
# (the README's test command and .ci/run) calls it.
#
#   ROOT=${QPASS_ARM_ROOT:-$HOME/.cache/qpass/aarch64}
#   ROOT/python -m tvm.exec.rpc_server --host 127.0.0.1 --port 9390
#
# ROOT is a bare Debian arm64 file tree (no chroot, no binfmt_misc): qemu-aarch64-static -L ROOT
# maps the emulated program's absolute paths (/lib/ld-linux-aarch64.so.1, /usr/lib/python3.11...)
# into it.
set -euo pipefail

sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
apt_updated=""
apt_update() {  # at most once per run, and only when something is missing
  [ -n "$apt_updated" ] || { $sudo apt-get update -q >/dev/null; apt_updated=1; }
}

if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  apt_update
  $sudo apt-get install -y -q gcc-aarch64-linux-gnu >/dev/null
fi
if ! command -v qemu-aarch64-static >/dev/null; then
  apt_update
  $sudo apt-get install -y -q qemu-user-static >/dev/null
fi

ROOT="${QPASS_ARM_ROOT:-$HOME/.cache/qpass/aarch64}"
SITE="$ROOT/site-packages"
PY="${PYTHON:-python}"  # the host (x86) Python whose pip fetches the aarch64 wheels

# Debian arm64 packages for a Python 3.11 that imports TVM and numpy: the interpreter, its
# stdlib's shared libraries (ssl, ctypes, bz2, lzma, sqlite3, uuid, crypt, zlib, expat) and the
# C++ runtime of libtvm*.so. Optional stdlib modules (curses, readline, dbm, nis) are left out.
DEBS="libc6 libgcc-s1 libstdc++6 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5
  libsqlite3-0 libuuid1 libcrypt1 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal"

# TVM and what its RPC server imports at run time; apache-tvm-ffi pinned to the host's so both
# ends of the RPC speak the same runtime (0.1.15.post2 when the host has none yet).
ffi_version=$("$PY" -c 'import importlib.metadata as m; print(m.version("apache-tvm-ffi"))' \
  2>/dev/null || echo 0.1.15.post2)
WHEELS="apache-tvm==0.27.0.post1 apache-tvm-ffi==$ffi_version numpy ml_dtypes typing_extensions
  cloudpickle psutil"

# Each step leaves a stamp holding its inputs; a matching stamp means the step is done.
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
# Byte-compile ahead: Debian compiles its stdlib in postinst, which dpkg-deb -x skips, and with
# PYTHONDONTWRITEBYTECODE set no run caches .pyc, so every emulated start would recompile (import
# tvm: ~30 s instead of ~13 s). .pyc files depend only on the 3.11 minor version, so a host 3.11
# writes them natively; any other host Python leaves it to the (slower) emulated one.
compile_py() {
  if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    "$PY" -m compileall -q -j0 "$1" >/dev/null || true
  else
    "$ROOT/python" -m compileall -q "$1" >/dev/null || true
  fi
}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$ROOT"

# The wrapper finds its root from its own path, so ROOT can be moved; PYTHONPATH is replaced, not
# extended, to keep the host's x86 packages out of the emulated interpreter.
cat > "$tmp/python" <<'EOF'
#!/bin/sh
# aarch64 Python 3.11 with TVM, run under qemu-user (written by qpasses' tools/setup_arm.sh).
root=$(cd "$(dirname "$0")" && pwd)
export QPASS_ARM_PYTHON="$root/python"
export PYTHONPATH="$root/site-packages"
exec qemu-aarch64-static -L "$root" "$root/usr/bin/python3.11" "$@"
EOF
cmp -s "$tmp/python" "$ROOT/python" || install -m 755 "$tmp/python" "$ROOT/python"

debs_key=$(echo $DEBS)
if ! stamp_ok "$ROOT/.debs" "$debs_key"; then
  # The arm64 package lists let apt-get download fetch arm64 .debs; nothing arm64 is installed
  # on the host (apt-get install python3.11:arm64 would replace the host's python3.11).
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $sudo dpkg --add-architecture arm64
    apt_updated=""
  fi
  apt_update
  chmod 755 "$tmp"  # apt's _apt user writes the downloads
  (cd "$tmp" && apt-get download -q $(printf '%s:arm64 ' $DEBS) >"$tmp/apt.log" 2>&1) \
    || { cat "$tmp/apt.log" >&2; exit 1; }
  for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
  rm -f "$tmp"/*.deb
  compile_py "$ROOT/usr/lib/python3.11"
  echo "$debs_key" > "$ROOT/.debs"
fi

wheels_key=$(echo $WHEELS)
if ! stamp_ok "$ROOT/.wheels" "$wheels_key"; then
  rm -rf "$SITE"
  # The host pip resolves for the emulated interpreter; manylinux2014_aarch64 finds no TVM wheel.
  (cd "$tmp" && "$PY" -m pip install -q --disable-pip-version-check --no-compile \
    --target "$SITE" --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version 3.11 $WHEELS >"$tmp/pip.log" 2>&1) \
    || { cat "$tmp/pip.log" >&2; exit 1; }
  # TVM's RPC server starts its workers as `sys.executable -m ...`; without binfmt_misc the bare
  # aarch64 binary cannot be exec'd ("Exec format error"), so point sys.executable at the wrapper.
  cat > "$SITE/sitecustomize.py" <<'EOF'
import os
import sys

if os.environ.get("QPASS_ARM_PYTHON"):
    sys.executable = os.environ["QPASS_ARM_PYTHON"]
EOF
  compile_py "$SITE"
  echo "$wheels_key" > "$ROOT/.wheels"
fi

echo "aarch64 Python with TVM (qemu-user): $ROOT/python"
