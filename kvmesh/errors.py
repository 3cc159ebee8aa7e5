"""The project's own exceptions. Each names the gRPC status it maps to; the mapping to real
status codes happens at one boundary (the servicers), so engine code never imports grpc."""


class KvmeshError(Exception):
    """Base of every error kvmesh raises on purpose; `status` is a grpc.StatusCode name."""

    status = "INTERNAL"


class InvalidArgument(KvmeshError):
    """Bad input from a caller: empty prompt, bad sampling values, prompt longer than the context."""

    status = "INVALID_ARGUMENT"


class ModelError(KvmeshError):
    """A model folder or source file that cannot be used: missing, incomplete, unsupported."""

    status = "FAILED_PRECONDITION"


class ResourceExhausted(KvmeshError):
    """A queue or memory budget is full: back-pressure, never an out-of-memory crash."""

    status = "RESOURCE_EXHAUSTED"
