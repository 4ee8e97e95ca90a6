#!/usr/bin/env bash
# Creates .venv (if missing) with everything tarflow_ref needs; safe to run again.
# torch 2.13.0 (CPU) goes in first so that the range in requirements.txt installs nothing bigger.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# torch-fidelity: only the test oracle of the FID Inception network (tests/test_inception.py); --no-deps because
# its torchvision does not install beside the CPU torch, and the one module the test loads needs only torch
.venv/bin/pip install -q --disable-pip-version-check --no-deps torch-fidelity==0.4.0
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
