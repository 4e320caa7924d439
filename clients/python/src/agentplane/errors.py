"""gRPC status codes as Python exceptions.

Every failed call raises an AgentplaneError (or one of its subclasses below),
carrying the status code and the server's message; `str(e)` reads like
agentctl's diagnostics: `NOT_FOUND: agent 01j…: not found`.
"""

from __future__ import annotations

import grpc


class AgentplaneError(Exception):
    """A call failed with gRPC status `code` and the server's `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class Unauthenticated(AgentplaneError):
    """No token, or a token the control plane does not know (one message for both)."""


class PermissionDenied(AgentplaneError):
    """The token's role is too low, or a spawn falls outside its selector."""


class NotFound(AgentplaneError):
    """No agent or host with that id (or none visible to the token)."""


class Unavailable(AgentplaneError):
    """The control plane, its registry or the agent's host cannot be reached
    (also: no TLS handshake, e.g. plaintext to a TLS port). Safe to retry."""


class InvalidArgument(AgentplaneError):
    """A field of the request is wrong; the message names it."""


class AlreadyExists(AgentplaneError):
    """An agent with that name exists."""


class FailedPrecondition(AgentplaneError):
    """The agent's state does not allow it (pause an exited agent)."""


class ResourceExhausted(AgentplaneError):
    """No live host has room, or a host's limit is reached."""


class DeadlineExceeded(AgentplaneError):
    """The call's timeout passed before an answer."""


_BY_CODE: dict[grpc.StatusCode, type[AgentplaneError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def from_status(code: grpc.StatusCode, message: str) -> AgentplaneError:
    """The exception for `code`: a subclass when there is one, else the base."""
    return _BY_CODE.get(code, AgentplaneError)(code, message)


def from_rpc_error(e: grpc.RpcError) -> AgentplaneError:
    """The exception for a failed grpc call."""
    # A failed call is also a grpc.Call, which has code() and details().
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return from_status(code, details or "")
