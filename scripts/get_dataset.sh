#!/usr/bin/env bash
# Print a folder that holds the four Fashion-MNIST IDX files, getting them first if needed:
# Debian's dataset-fashion-mnist package when apt is usable as root, else the canonical URLs.
set -euo pipefail

debian=/usr/share/datasets/fashion-mnist
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
canonical=${FASHION_MNIST_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com}
root=$(cd "$(dirname "$0")/.." && pwd)

complete() {
  local f
  for f in "${files[@]}"; do [ -s "$1/$f" ] || return 1; done
}

if complete "$debian"; then echo "$debian"; exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian package dataset-fashion-mnist" >&2
  { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } >&2 || true
  if complete "$debian"; then echo "$debian"; exit 0; fi
fi

dest=${PIPELINE_HOME:-$root/.runtime}/downloads/fashion-mnist
mkdir -p "$dest"
for f in "${files[@]}"; do
  if [ ! -s "$dest/$f" ]; then
    echo "downloading $canonical/$f" >&2
    curl -fsSL --retry 3 --connect-timeout 10 -o "$dest/$f.part" "$canonical/$f"
    mv "$dest/$f.part" "$dest/$f"
  fi
done
echo "$dest"
