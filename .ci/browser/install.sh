#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the HTML report's browser test (tests/test_pipeline.py), when
# it is missing and apt-get is usable (root or passwordless sudo). Idempotent. Without it the test skips on a
# laptop, and fails under CI=true: CI must not pass a browser test that never opened a browser.
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" = 0 ]; then SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n)
else echo "[browser] chromium missing and no root for apt-get: the browser test will say so" >&2; exit 0
fi
command -v apt-get >/dev/null || { echo "[browser] no apt-get: cannot install chromium" >&2; exit 0; }
t0=$SECONDS
if ! apt-cache show chromium >/dev/null 2>&1; then "${SUDO[@]}" apt-get update -q >/dev/null; fi
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium \
    >"${TMPDIR:-/tmp}/ldm-chromium-apt.log" 2>&1 \
    || { tail -20 "${TMPDIR:-/tmp}/ldm-chromium-apt.log" >&2; echo "[browser] apt-get install chromium failed" >&2; exit 1; }
echo "[browser] chromium installed in $((SECONDS - t0)) s" >&2
