#!/usr/bin/env bash
# Make sure Debian's Chromium is on disk for the browser tests (tests/e2e/, Playwright drives it):
# packages chromium and chromium-driver, installed when apt is usable as root. Prints its path.
set -euo pipefail

chromium=/usr/bin/chromium
if [ ! -x "$chromium" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian packages chromium chromium-driver" >&2
  packages=(chromium chromium-driver)
  { apt-get install -y -qq --no-install-recommends "${packages[@]}" \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}"; }; } >&2 || true
fi
if [ ! -x "$chromium" ]; then
  echo "error: $chromium: expected Debian's chromium for the browser tests, found nothing" \
       "(as root: apt-get install chromium chromium-driver)" >&2
  exit 1
fi
echo "$chromium"
