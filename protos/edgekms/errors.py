"""Typed errors of EdgeKMS and their three encodings.

An error is a KMSError subclass carrying a stable `reason`. It travels on NATS as an
edgekms.v1.Error payload (with nats.micro's error headers), and comes out of the broker
as the gRPC status of its code with the Error in trailing metadata, so clients can
rebuild the same exception type on their side.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from edgekms.v1 import common_pb2

ERROR_METADATA_KEY = "edgekms-error-bin"


class KMSError(Exception):
    """Base class. `reason` is stable and dotted ("key.not_found"); `message` is prose."""

    code: ClassVar[common_pb2.ErrorCode.ValueType] = common_pb2.ERROR_CODE_INTERNAL
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

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
    def code_name(self) -> str:
        return common_pb2.ErrorCode.Name(self.code)


class InvalidArgument(KMSError):
    code = common_pb2.ERROR_CODE_INVALID_ARGUMENT
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KMSError):
    code = common_pb2.ERROR_CODE_NOT_FOUND
    grpc_status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KMSError):
    code = common_pb2.ERROR_CODE_ALREADY_EXISTS
    grpc_status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(KMSError):
    code = common_pb2.ERROR_CODE_FAILED_PRECONDITION
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(KMSError):
    code = common_pb2.ERROR_CODE_PERMISSION_DENIED
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(KMSError):
    code = common_pb2.ERROR_CODE_UNAUTHENTICATED
    grpc_status = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(KMSError):
    code = common_pb2.ERROR_CODE_UNAVAILABLE
    grpc_status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(KMSError):
    code = common_pb2.ERROR_CODE_DEADLINE_EXCEEDED
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(KMSError):
    code = common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(KMSError):
    code = common_pb2.ERROR_CODE_INTERNAL
    grpc_status = grpc.StatusCode.INTERNAL


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
_BY_GRPC: dict[grpc.StatusCode, type[KMSError]] = {
    cls.grpc_status: cls for cls in _BY_CODE.values()
}


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
    cls = _BY_GRPC.get(status, Internal)
    reason = {
        grpc.StatusCode.UNAVAILABLE: "transport.unavailable",
        grpc.StatusCode.DEADLINE_EXCEEDED: "transport.deadline",
        grpc.StatusCode.UNAUTHENTICATED: "auth.unauthenticated",
    }.get(status, "transport." + status.name.lower())
    return cls(reason, details or status.name)
