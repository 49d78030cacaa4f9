#!/usr/bin/env bash
# Download the wheels that the GPU machine lacks into bench/gpu/wheels/ (git-ignored), to be carried with
# the device tool's run (carry ["bench/gpu/wheels"]). Run here, where PyPI is reachable, after `make setup`.
#   bash bench/gpu/prepare.sh [--python-version 3.12] [--bnb-cuda 130,132|all] [--no-xformers]
#                             [--no-bitsandbytes] [--extra NAME==VERSION ...]
# Options are bench/gpu/wheels.py's; it prints each wheel's size and the total (keep it under ~60 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" bench/gpu/wheels.py "$@"
