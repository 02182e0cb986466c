#!/usr/bin/env bash
# Create .venv and install edge_ad with everything needed to train, convert, run and test on a CPU box.
#
# torch is pinned explicitly: left unpinned, timm/peft pull a different multi-GB build. 2.14.1 with
# torchvision 0.29.1 is the pair that imports together on CPU (PyPI torchvision fails beside 2.13.0).
# Override with EDGE_AD_TORCH_SPEC, e.g. EDGE_AD_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" on aarch64.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${EDGE_AD_VENV:-.venv}"
TORCH_SPEC="${EDGE_AD_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC"
# shellcheck disable=SC2086  # the spec is a list of requirements
"${PIP[@]}" install -q $TORCH_SPEC
echo "[setup] building and installing edge-ad (C++ extension included) with extras train,convert,opencv,synth,sign,dev"
# Pass the same torch pin again so no extra's dependency can swap the build underneath us.
# shellcheck disable=SC2086
"${PIP[@]}" install -q -e ".[train,convert,opencv,synth,sign,dev]" $TORCH_SPEC
"$VENV/bin/edge-ad" info
