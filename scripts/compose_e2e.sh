#!/usr/bin/env bash
# The compose cluster, run for real: builds the kvmesh image with podman (no registry: the base
# image comes from debootstrap, the wheels from the host), brings compose/docker-compose.yml up with
# podman-compose, checks it from the host with the project's client (tests/compose_check.py), and
# brings everything down, also when a step fails. Facts and workarounds: ../shared/notes/containers.md.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$PWD/.venv/bin/python}
work=${KVMESH_COMPOSE_WORK:-/var/tmp/kvmesh-compose}
project=kvmesh
compose=(podman-compose -p "$project" -f compose/docker-compose.yml)
export CONTAINERS_CONF=$work/containers.conf
KVMESH_CLUSTER_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')  # the cluster's secret, this run's own
export KVMESH_CLUSTER_TOKEN
mkdir -p "$work"

say() { printf 'compose e2e: %s\n' "$*" >&2; }
if ! command -v podman >/dev/null || ! command -v podman-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing podman, podman-compose, debootstrap, runc"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman podman-compose debootstrap runc >/dev/null
fi

# Quirks 1 and 2: root here cannot raise limits, and crun rejects cgroups v1 hybrid.
cat > "$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
if ! podman info >/dev/null 2>&1; then
  say "this machine cannot run containers (podman info fails): FAILED"
  podman info >&2 || true
  exit 1
fi

PYTHON="$py" ENGINE=podman bash scripts/compose_build.sh

cleanup() {
  podman rm -f "${project}_decode-1_2" >/dev/null 2>&1 || true  # the replica tests/compose_check.py adds
  "${compose[@]}" down -v >/dev/null 2>&1 || true
  for net in mesh public; do podman network rm -f "${project}_$net" >/dev/null 2>&1 || true; done
  podman volume rm -f "${project}_models" "${project}_prefill-0-store" "${project}_prefill-1-store" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

# Quirk 3: netavark leaves the bridge's MAC unpinned and DNS between containers stalls; pin it.
mac=1
for net in mesh public; do
  name=${project}_$net
  if [ "$net" = mesh ]; then podman network create --internal "$name" >/dev/null; else podman network create "$name" >/dev/null; fi
  br=$(podman network inspect "$name" -f '{{.NetworkInterface}}')
  gw=$(podman network inspect "$name" -f '{{range .Subnets}}{{.Gateway}}{{end}}')
  sub=$(podman network inspect "$name" -f '{{range .Subnets}}{{.Subnet}}{{end}}')
  ip link add "$br" type bridge 2>/dev/null || true
  ip link set "$br" address "02:00:00:00:00:0$mac"
  ip addr add "$gw/${sub#*/}" dev "$br" 2>/dev/null || true
  ip link set "$br" up
  mac=$((mac + 1))
done

say "up"
start=$(date +%s)
# (podman without systemd cannot run compose healthchecks and says so: that noise goes to the log)
"${compose[@]}" --podman-run-args='--dns-option=timeout:1 --dns-option=attempts:5' up -d >"$work/up.log" 2>&1
if ! "$py" tests/compose_check.py --endpoint 127.0.0.1:"${KVMESH_PORT:-50051}" --http "http://127.0.0.1:${KVMESH_HTTP_PORT:-8000}" --project "$project"; then
  say "FAILED; container logs follow"
  for c in $(podman ps -a --filter "label=io.podman.compose.project=$project" --format '{{.Names}}'); do
    echo "== $c" >&2; podman logs --tail 30 "$c" >&2 || true
  done
  exit 1
fi
say "passed in $(( $(date +%s) - start )) s from up"
