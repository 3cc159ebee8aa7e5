#!/usr/bin/env bash
# Generates the Python stubs of protos/kvmesh/v1/*.proto into kvmesh/v1/ (messages, gRPC
# services and their type stubs). --check regenerates into a temporary folder and fails when the
# committed stubs differ: CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=.
if [ "${1:-}" = "--check" ]; then out=$(mktemp -d); fi
"$py" -m grpc_tools.protoc -Iprotos --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$py")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  protos/kvmesh/v1/*.proto
if [ "$out" != . ]; then
  if ! diff -r -x __pycache__ -x __init__.py "$out/kvmesh/v1" kvmesh/v1; then
    echo "generated stubs in kvmesh/v1 are stale: run bash scripts/gen_protos.sh" >&2
    exit 1
  fi
  rm -rf "$out"
fi
