"""The wire, package kvmesh.v1: stubs generated from protos/ by scripts/gen_protos.sh."""
