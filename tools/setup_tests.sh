#!/usr/bin/env bash
# Everything the test suite needs beyond pip, from Debian's packages. Idempotent; the README's
# test command and .ci/run call it.
#   - the ARM toolchain and the aarch64 TVM runtime under qemu-user (tools/setup_arm.sh);
#   - Chromium, which renders `qpass quantize --html` pages headless in tests/test_html_report.py;
#   - espeak-ng, the speech the real-model corpus calibrates the VAD model on (tools/corpus_data.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_arm.sh
if ! command -v chromium >/dev/null || ! command -v espeak-ng >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q --no-install-recommends chromium espeak-ng >/dev/null
fi
