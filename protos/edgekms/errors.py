"""Typed errors of EdgeKMS and their three encodings.

An error is a KMSError subclass carrying a stable `reason`. It travels on NATS as an
edgekms.v1.Error payload (with nats.micro's error headers), and comes out of the broker
as the gRPC status of its code with the Error in trailing metadata, so clients can
rebuild the same exception type on their side.

grpc is imported only where a gRPC status is asked for: the crypto service never speaks
gRPC and would otherwise carry the whole library (about 20 MB) for the names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from edgekms.v1 import common_pb2

if TYPE_CHECKING:
    import grpc

ERROR_METADATA_KEY = "edgekms-error-bin"


class KMSError(Exception):
    """Base class. `reason` is stable and dotted ("key.not_found"); `message` is prose."""

    code: ClassVar[common_pb2.ErrorCode.ValueType] = common_pb2.ERROR_CODE_INTERNAL
    grpc_name: ClassVar[str] = "INTERNAL"  # the grpc.StatusCode member this error maps to

    def __init__(self, reason: str, message: str, details: dict[str, str] | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.details = dict(details or {})

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"

    def to_proto(self) -> common_pb2.Error:
        return common_pb2.Error(
            code=self.code, reason=self.reason, message=self.message, details=self.details
        )

    @property
    def grpc_status(self) -> grpc.StatusCode:
        import grpc

        return getattr(grpc.StatusCode, self.grpc_name)  # type: ignore[no-any-return]

    @property
    def code_name(self) -> str:
        return common_pb2.ErrorCode.Name(self.code)


class InvalidArgument(KMSError):
    code = common_pb2.ERROR_CODE_INVALID_ARGUMENT
    grpc_name = "INVALID_ARGUMENT"


class NotFound(KMSError):
    code = common_pb2.ERROR_CODE_NOT_FOUND
    grpc_name = "NOT_FOUND"


class AlreadyExists(KMSError):
    code = common_pb2.ERROR_CODE_ALREADY_EXISTS
    grpc_name = "ALREADY_EXISTS"


class FailedPrecondition(KMSError):
    code = common_pb2.ERROR_CODE_FAILED_PRECONDITION
    grpc_name = "FAILED_PRECONDITION"


class PermissionDenied(KMSError):
    code = common_pb2.ERROR_CODE_PERMISSION_DENIED
    grpc_name = "PERMISSION_DENIED"


class Unauthenticated(KMSError):
    code = common_pb2.ERROR_CODE_UNAUTHENTICATED
    grpc_name = "UNAUTHENTICATED"


class Unavailable(KMSError):
    code = common_pb2.ERROR_CODE_UNAVAILABLE
    grpc_name = "UNAVAILABLE"


class DeadlineExceeded(KMSError):
    code = common_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    grpc_name = "DEADLINE_EXCEEDED"


class ResourceExhausted(KMSError):
    code = common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED
    grpc_name = "RESOURCE_EXHAUSTED"


class Internal(KMSError):
    code = common_pb2.ERROR_CODE_INTERNAL
    grpc_name = "INTERNAL"


_BY_CODE: dict[common_pb2.ErrorCode.ValueType, type[KMSError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        ResourceExhausted,
        Internal,
    )
}
_BY_GRPC_NAME: dict[str, type[KMSError]] = {cls.grpc_name: cls for cls in _BY_CODE.values()}


def from_proto(err: common_pb2.Error) -> KMSError:
    cls = _BY_CODE.get(err.code, Internal)
    return cls(err.reason or "unknown", err.message, dict(err.details))


def from_bytes(payload: bytes) -> KMSError:
    err = common_pb2.Error()
    try:
        err.ParseFromString(payload)
    except Exception:
        return Internal("wire.bad_error", "an error arrived that could not be decoded")
    return from_proto(err)


def from_grpc(status: grpc.StatusCode, details: str, trailing: bytes | None) -> KMSError:
    """Rebuild the typed error from a gRPC failure (trailing Error if present)."""
    if trailing:
        return from_bytes(trailing)
    cls = _BY_GRPC_NAME.get(status.name, Internal)
    reason = {
        "UNAVAILABLE": "transport.unavailable",
        "DEADLINE_EXCEEDED": "transport.deadline",
        "UNAUTHENTICATED": "auth.unauthenticated",
    }.get(status.name, "transport." + status.name.lower())
    return cls(reason, details or status.name)
