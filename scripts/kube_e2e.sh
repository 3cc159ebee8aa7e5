#!/usr/bin/env bash
# deploy/kubernetes run for real on this machine, with podman (no Kubernetes here): the cpu overlay
# rendered by kubectl kustomize, turned into what `podman kube play` plays (tests/kube_check.py:
# every replica as a Pod named as Kubernetes names it, a PVC per prefill pod, the model Job as a
# Pod writing the model's volume that the others wait for and mount read-only), played on a podman
# network with the same image as the compose file, checked from the host (an answer, a second turn
# with cached tokens, a prefill pod killed and the next request served), then torn down, also when
# a step fails. Needs the image: scripts/compose_e2e.sh (or compose_build.sh) builds it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$PWD/.venv/bin/python}
work=${KVMESH_COMPOSE_WORK:-/var/tmp/kvmesh-compose}/kube
net=kvmesh-kube
export CONTAINERS_CONF=${KVMESH_COMPOSE_WORK:-/var/tmp/kvmesh-compose}/containers.conf  # written by compose_e2e.sh
mkdir -p "$work"
say() { printf 'kube e2e: %s\n' "$*" >&2; }

version=$("$py" -c 'import importlib.metadata as m; print(m.version("kvmesh"))')
podman image inspect "localhost/kvmesh:$version" >/dev/null  # else: run scripts/compose_build.sh first
kubectl kustomize deploy/kubernetes/overlays/cpu > "$work/rendered.yaml"
# The cluster token: podman 4.3 does not hand a Kubernetes Secret's keys to secretKeyRef (seen
# here: the variable stays unset), so this run puts it in the ConfigMap it plays instead; the
# internal calls between the pods then carry it and require it, as with the Secret.
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
KVMESH_E2E_TOKEN=$token "$py" tests/kube_check.py render "$work/rendered.yaml" "$work/play.yaml" "$work/configmap.yaml"

cleanup() {
  podman kube down "$work/play.yaml" >/dev/null 2>&1 || true
  for v in kvmesh-model $(podman volume ls -q --filter name=store-kvmesh-prefill); do podman volume rm -f "$v" >/dev/null 2>&1 || true; done
  podman network rm -f "$net" >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup

# containers.md, quirk 3: pin the bridge's MAC, or DNS between pods stalls
podman network create "$net" >/dev/null
br=$(podman network inspect "$net" -f '{{.NetworkInterface}}')
gw=$(podman network inspect "$net" -f '{{range .Subnets}}{{.Gateway}}{{end}}')
sub=$(podman network inspect "$net" -f '{{range .Subnets}}{{.Subnet}}{{end}}')
ip link add "$br" type bridge 2>/dev/null || true
ip link set "$br" address 02:00:00:00:00:09
ip addr add "$gw/${sub#*/}" dev "$br" 2>/dev/null || true
ip link set "$br" up

say "play"
start=$(date +%s)
podman kube play --network "$net" --configmap "$work/configmap.yaml" "$work/play.yaml" >"$work/play.log" 2>&1
if ! timeout 600 "$py" tests/kube_check.py check; then
  say "FAILED; pod logs follow"
  for c in $(podman ps -a --format '{{.Names}}' | grep '^kvmesh-'); do echo "== $c" >&2; podman logs --tail 30 "$c" >&2 || true; done
  exit 1
fi
# the model came from the Job's volume: the Job's pod ended well, and the image holds none
if [ "$(podman inspect kvmesh-model-prepare -f '{{.State.ExitCode}}')" != 0 ]; then
  say "FAILED: the model Job's pod did not end well"; podman logs --tail 30 kvmesh-model-prepare >&2 || true
  exit 1
fi
if podman run --rm --network none "localhost/kvmesh:$version" test -e /models/models; then
  say "FAILED: the image holds a model (it should come from the Job's volume alone)"
  exit 1
fi
if ! podman exec kvmesh-decode-0-decode sh -c 'test -n "$KVMESH_DECODE_CLUSTER_TOKEN"'; then
  say "FAILED: the pods run without the cluster token"
  exit 1
fi
say "passed in $(( $(date +%s) - start )) s from play"
