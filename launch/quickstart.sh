#!/usr/bin/env bash
# The embedded default job in one command: installs what is missing (a virtual environment with torch,
# DeepSpeed and megamoe), then trains configs/quickstart.yaml on 2 ranks through the deepspeed launcher
# (GPUs where present, CPU ranks otherwise) and prints the run directory holding the HF model, its model
# card and metrics.json. Extra arguments are dotted overrides, e.g. train.max_steps=50.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    echo "Usage: bash launch/quickstart.sh [dotted.overrides ...]   (VENV=path to use another environment)"
    exit 0
fi

cd "$(dirname "$0")/.."
# CPU ranks train ~1.5x faster on tcmalloc than on glibc's malloc (docs/launch.md, "Host memory"): install it
# where this script may (root with apt); elsewhere megamoe says how, and trains on the system's malloc.
if ! command -v nvidia-smi >/dev/null && ! ldconfig -p | grep -q libtcmalloc \
    && [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    echo "quickstart: installing tcmalloc (libtcmalloc-minimal4)"
    apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 \
            && apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null 2>&1; } \
        || echo "quickstart: could not install tcmalloc; training on the system's malloc"
fi
venv="${VENV:-.venv}"
if [[ ! -x "$venv/bin/megamoe" ]]; then
    echo "quickstart: installing into $venv (torch 2.13.0 first: other versions download GBs of CUDA)"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet -e .
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

megamoe data prepare
exec deepspeed --num_gpus 2 --no_local_rank --module megamoe train configs/quickstart.yaml "$@"
