"""kvmesh simulate: the proxy's routing policies on a simulated fleet."""
