#!/usr/bin/env bash
# Builds kvmesh's ONNX Runtime kernels (kvmesh/model/ops/*.cc) into kvmesh/model/ops/libkvmesh_ops.so.
# ONNX Runtime's wheel carries no C headers, so they come from Debian's own package of them
# (libonnxruntime-dev of trixie, through this machine's Debian mirror, checked against its pinned
# sha256): the C API is versioned, and a library built against its version 21 loads into any later
# ONNX Runtime. Idempotent: nothing is fetched or compiled when the library is newer than its source.
# Needs g++ and dpkg-deb; without them, or without the mirror, it fails and decode graphs keep ORT's
# GroupQueryAttention (`kvmesh model prepare` writes them so).
set -euo pipefail
cd "$(dirname "$0")/.."
src=kvmesh/model/ops/decode_attention.cc
lib=kvmesh/model/ops/libkvmesh_ops.so
headers=build/ort-headers
deb=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
sha=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
say() { printf 'build_ops: %s\n' "$*" >&2; }

if [ -f "$lib" ] && [ "$lib" -nt "$src" ] && [ "$lib" -nt "$0" ]; then exit 0; fi
if [ "$(uname -m)" != x86_64 ]; then say "x86_64 only for now"; exit 1; fi
if [ ! -f "$headers/onnxruntime_c_api.h" ]; then
  mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | head -1 | awk '{print $2}')
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | head -1 | awk '{print $2}')
  [ -n "$mirror" ] || { say "no Debian mirror in this machine's apt sources"; exit 1; }
  apt_dir=$(mktemp -d)
  trap 'rm -rf "$apt_dir"' EXIT
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s trixie main\n' "$mirror" > "$apt_dir/sources.list"
  opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root -qq)
  say "ONNX Runtime's C headers from Debian's $deb"
  apt-get "${opts[@]}" update
  (cd "$apt_dir" && apt-get "${opts[@]}" download libonnxruntime-dev=1.21.0+dfsg-1)
  echo "$sha  $apt_dir/$deb" | sha256sum --check --quiet
  dpkg-deb -x "$apt_dir/$deb" "$apt_dir/root"
  mkdir -p "$headers"
  cp "$apt_dir"/root/usr/include/onnxruntime/*.h "$headers/"
fi
# The AVX-512 kernels are chosen at run time (target attributes); the rest is plain x86-64.
g++ -O3 -std=c++17 -shared -fPIC -fvisibility=hidden -Wall -Wextra -Wno-uninitialized -Wno-maybe-uninitialized \
  -I"$headers" "$src" -o "$lib.partial"
mv "$lib.partial" "$lib"
say "built $lib"
