"""kvmesh bench: the workload generator, its driver, the cost cascade and its report."""
