#!/usr/bin/env bash
# Plays a new user on a stock Debian/Ubuntu: copies this checkout (tracked and untracked files, not
# ignored ones) into a temporary folder and runs the README's first command there, with
# `demo --smoke`, under `env -i` with only the system directories on PATH. So python3 is the
# distribution's own, which refuses `pip install` outside a virtual environment (PEP 668), there is
# no `python` command, and nothing of a pyenv, conda or activated environment is visible.
# Kept from the caller: the package sources and network settings (PIP_* variables, the user's
# pip.conf, proxy and CA variables), so a mirror or a local wheel folder still serves.
# It downloads torch (about 200 MB) and takes minutes, so it is not part of the test suite:
#   bash scripts/check-stock-setup.sh [--keep]     (--keep leaves the temporary folder behind)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "check-stock-setup: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

keep=0
case "${1:-}" in
  "") ;;
  --keep) keep=1 ;;
  *) fail "unknown option '$1': the only option is --keep" ;;
esac
work=$(mktemp -d "${TMPDIR:-/tmp}/selfalign-stock.XXXXXX")
if [[ $keep == 1 ]]; then say "working in $work (kept)"; else trap 'rm -rf "$work"' EXIT; fi
mkdir -p "$work/home" "$work/repo"
started=$SECONDS

system() { env -i HOME="$work/home" PATH="$SYSTEM_PATH" "$@"; }

# --- the distribution's python3 (the set-up script itself installs python3-venv where it is missing)
if ! system sh -c 'command -v python3' >/dev/null; then
  command -v apt-get >/dev/null || fail "no python3 among the system directories and no apt-get to install it"
  say "installing the distribution's python3 with apt-get"
  as_root=(); [[ $(id -u) -eq 0 ]] || as_root=(sudo)
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
fi
python3=$(system sh -c 'command -v python3')
say "system python3: $python3 ($(system python3 --version 2>&1)); python3-venv present before: $(
  system python3 -c 'import ensurepip' 2>/dev/null && echo yes || echo no)"

# --- really the stock case: externally managed, pip refused outside a virtual environment --------
marker=$(system python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED
[[ -f $marker ]] || fail "$python3 is not externally managed (no $marker): the stock case of Debian 12+/Ubuntu 23.04+ is not reproduced here"
if refusal=$(system python3 -m pip install --dry-run --no-index --no-deps pip 2>&1); then
  fail "$python3 -m pip install was accepted outside a virtual environment (a pip.conf with break-system-packages?): not the stock case"
fi
grep -q -e externally-managed-environment -e "No module named pip" <<<"$refusal" ||
  fail "pip install outside a virtual environment failed for another reason than PEP 668: $(tail -1 <<<"$refusal")"
say "confirmed: $marker exists and pip install outside a virtual environment is refused"

# --- no `python` command: where the system has one (python-is-python3), a PATH of links hides it ---
path=$SYSTEM_PATH
if system sh -c 'command -v python' >/dev/null; then
  mkdir "$work/bin"
  IFS=: read -ra system_dirs <<<"$SYSTEM_PATH"
  for dir in "${system_dirs[@]}"; do
    for tool in "$dir"/*; do
      name=${tool##*/}
      [[ -x $tool && ! -d $tool && $name != python && ! -e $work/bin/$name ]] && ln -s "$tool" "$work/bin/$name"
    done
  done
  path=$work/bin
  say "the system has $(system sh -c 'command -v python'); PATH is a folder of links to the system tools without it"
fi
env -i PATH="$path" sh -c '! command -v python' >/dev/null || fail "a python command is still on the PATH"

# --- a fresh copy of the checkout, and the README's first command with --smoke -----------------------
git -C "$repo" rev-parse --git-dir >/dev/null 2>&1 || fail "$repo is not a git checkout: the copy takes its tracked and untracked files"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) 2>/dev/null |
  tar -C "$work/repo" -xf -
command=$(awk '/^```bash/ { getline; print; exit }' "$repo/README.md")
[[ $command == *" demo" ]] || fail "the README's first command does not end with 'demo': '$command'"
say "running '$command --smoke' in $work/repo with PATH=$path"

passed=(HOME="$work/home" PATH="$path")
while IFS='=' read -r name _; do
  case "$name" in
    PIP_* | http_proxy | https_proxy | no_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY | ALL_PROXY | SSL_CERT_FILE | REQUESTS_CA_BUNDLE)
      passed+=("$name=${!name}") ;;
  esac
done < <(env)
for config in "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf" "$HOME/.pip/pip.conf"; do
  if [[ -z "${PIP_CONFIG_FILE:-}" && -f $config ]]; then passed+=("PIP_CONFIG_FILE=$config"); break; fi
done

(cd "$work/repo" && env -i "${passed[@]}" bash -c "$command --smoke") || fail "'$command --smoke' failed (exit $?)"

# --- what it made ------------------------------------------------------------------------------------
venv_base=$("$work/repo/.venv/bin/python" -c 'import sys; print(sys.base_prefix)')
[[ $venv_base == /usr || $venv_base == /usr/local ]] || fail ".venv was made from $venv_base, not the system python3"
[[ -f $work/repo/runs/demo/report.md ]] || fail "the demo wrote no runs/demo/report.md"
say "passed in $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s: .venv from the system Python ($venv_base), runs/demo/report.md written"
