#!/usr/bin/env bash
# Set up a source checkout for development and the tests: the system packages that are missing (Debian's chromium,
# Node >= 20 with npm), .venv with the package and its test extras, and the npm packages of the web demo and of the
# TF.js check's Node driver. README.md's Install runs this, and .ci/run runs README.md's install block itself, so the
# documented install and CI's cannot drift apart.
#
#   bash tools/setup.sh                 # torch==2.13.0 from pip's configured index (a local CPU wheel on our machines)
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash tools/setup.sh    # from PyPI: the CPU build of torch
#
# apt-get runs only when something is missing, directly as root, else through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
PY=${PYTHON:-python3}

fail() { echo "error: $*" >&2; exit 1; }
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
apt_install() {
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        command -v sudo >/dev/null || fail "installing $* needs root: run \`apt-get install -y $*\` as root, then re-run"
        sudo=(sudo)
    fi
    command -v apt-get >/dev/null || fail "$* missing and no apt-get here: install them, then re-run"
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# System. Playwright drives Debian's chromium (it downloads no browser). Node >= 20: Debian 12's nodejs is 18, so
# there it must come from NodeSource or nvm; NodeSource's nodejs ships npm (and conflicts with Debian's npm package).
missing=()
command -v chromium >/dev/null || missing+=(chromium)
if ! command -v node >/dev/null || [ "$(node_major)" -lt 20 ]; then
    candidate=$(apt-cache policy nodejs 2>/dev/null | awk '/Candidate:/ {print $2}')
    major=${candidate#*:}
    major=${major%%.*}
    [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -ge 20 ] || fail "Node >= 20 is needed (found $(node --version 2>/dev/null \
|| echo none); this system's nodejs package is ${candidate:-absent}): install Node 20+ with npm from NodeSource \
(https://github.com/nodesource/distributions) or nvm, then re-run"
    missing+=(nodejs)
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
command -v npm >/dev/null || apt_install npm  # Debian's own nodejs comes without npm

# Python 3.10+: a venv with the package (editable) and the extras the tests use.
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || fail "Python >= 3.10 is needed ($PY is older)"
"$PY" -m venv .venv
. .venv/bin/activate
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
fi
python -m pip install -q -e '.[dev,tflite]'

# Node: the web demo's onnxruntime-web and the TF.js driver's @tensorflow/tfjs, each pinned by its package-lock.json.
npm ci --prefix web_demo --no-audit --no-fund --ignore-scripts
npm ci --prefix rwkv_export/js --no-audit --no-fund --ignore-scripts
echo "setup: done (. .venv/bin/activate to use it)"
