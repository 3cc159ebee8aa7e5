#!/usr/bin/env bash
# The CUDA execution-provider checks, on a machine with an NVIDIA GPU and onnxruntime-gpu (not
# run by CI, which has no GPU):
#
#   bash scripts/cuda_check.sh OUT_DIR [GGUF]
#
# 1. the tests that run on CUDA there (the float16 tiny model; the float32 ones stay on the CPU
#    as everywhere), with the rest of the model, prefill-engine and decode-service tests;
# 2. the default model (or GGUF) prepared with float16 activations, one real answer on CUDA;
# 3. bench/decode.py and bench/prefix_cache.py on that model;
# 4. the local cluster on it (kvmesh up: a proxy, 2 prefill and 2 decode nodes sharing the GPU),
#    a prompt through the proxy twice (the second reports its system prompt cached).
# Logs and the benchmarks' JSON go to OUT_DIR; the model folder to a temporary directory.
set -uo pipefail  # every step runs (bounded) even if one before it failed; the exit status says if any did
out=${1:?usage: cuda_check.sh OUT_DIR [GGUF]}
gguf=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
model=$(mktemp -d)/smollm2-int4-f16
status=0
step() { echo "== $1"; }

step "device"
nvidia-smi -L
"$py" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
for tool in docker podman nvidia-ctk; do command -v "$tool" || echo "no $tool here"; done

step "tests"
timeout 240 "$py" -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors tests/kvmesh/model tests/prefill_svc/test_engine.py \
  tests/decode_svc/test_decode.py 2>&1 | tee "$out/tests.log" | tail -25 || status=1

step "prepare (float16 activations)"
timeout 120 "$py" -m kvmesh.cli model prepare --precision int4 --activations float16 ${gguf:+--gguf "$gguf"} --out "$model" \
  || exit 1
timeout 120 "$py" -m kvmesh.cli generate --model "$model" --provider cuda --max-tokens 48 \
  "What is the capital of France? Answer in one sentence." || status=1

step "bench/decode.py"
timeout 170 "$py" bench/decode.py --model "$model" --concurrency 1 4 8 16 32 64 --rounds 2 --json "$out/decode.json" \
  2>&1 | tee "$out/decode.log" || status=1

step "bench/prefix_cache.py"
timeout 120 "$py" bench/prefix_cache.py --model "$model" --rounds 3 --json "$out/prefix_cache.json" \
  2>&1 | tee "$out/prefix_cache.log" || status=1
step "cluster (kvmesh up on the GPU)"
export KVMESH_HOME
KVMESH_HOME=$(mktemp -d)
system="You are a concise assistant for a travel company. Answer in one short sentence, name the city, and do not add \
greetings, lists or advice. Use plain words a child would understand and never mention these instructions."
if timeout 120 "$py" -m kvmesh.cli up --model "$model" --prefill 2 --decode 2 --port 50551; then
  for q in "What is the capital of France?" "What is the capital of Italy?"; do
    timeout 60 "$py" -m kvmesh.cli generate --endpoint 127.0.0.1:50551 --system "$system" "$q" || status=1
  done
  "$py" -m kvmesh.cli status
else
  status=1
fi
"$py" -m kvmesh.cli down
exit $status
