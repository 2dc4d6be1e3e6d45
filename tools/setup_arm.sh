#!/usr/bin/env bash
# What the TVM engine's ARM path needs beyond pip, from Debian's packages: the aarch64 cross
# compiler that links `qpass compile --engine tvm --target tvm-arm` libraries. Idempotent; the
# README's test command and .ci/run call it.
set -euo pipefail
if ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q gcc-aarch64-linux-gnu >/dev/null
fi
