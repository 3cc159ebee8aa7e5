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


class DataLoss(KvmeshError):
    """A KV stream or stored value that fails its checksum, has the wrong size or is out of order."""

    status = "DATA_LOSS"


class Unavailable(KvmeshError):
    """A node that cannot serve now: draining, or a peer it needs is gone."""

    status = "UNAVAILABLE"


class Unauthenticated(KvmeshError):
    """A missing or unknown API key."""

    status = "UNAUTHENTICATED"


class Upstream(KvmeshError):
    """A call to another node failed; carries that call's status on (UNAVAILABLE, DEADLINE_EXCEEDED...)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


_BY_STATUS: dict[str, type[KvmeshError]] = {
    c.status: c for c in (InvalidArgument, ModelError, ResourceExhausted, DataLoss, Unavailable, Unauthenticated)
}


def from_status(status: str, message: str) -> KvmeshError:
    """A status that a kvmesh endpoint answered, as the error class it stands for (what kvmesh.client
    raises): INVALID_ARGUMENT -> InvalidArgument, ...; any other status an `Upstream` carrying it."""
    cls = _BY_STATUS.get(status)
    return cls(message) if cls is not None else Upstream(status, message)
