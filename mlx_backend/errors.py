"""Errors that carry a gRPC status, mapped to the wire in one place.

Code anywhere in the package raises `BackendError` (or a subclass) with a
message a person can act on; `backend.py` turns it into the call's status.
Anything else escaping a handler is a bug and is answered INTERNAL.
"""

import grpc


class BackendError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self):
        return str(self)


class InvalidArgument(BackendError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(BackendError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(BackendError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(BackendError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(BackendError):
    code = grpc.StatusCode.CANCELLED


class Unavailable(BackendError):
    code = grpc.StatusCode.UNAVAILABLE
