"""agentplane: a Python client of the agentplane control plane.

    import agentplane
    with agentplane.Client("https://127.0.0.1:7700", ca="ca.crt", token_file="admin.token") as c:
        print([h.id for h in c.hosts()])

The messages are the generated ones (agentplane.v1.types_pb2); failed calls
raise AgentplaneError subclasses.
"""

from .client import DEFAULT_TIMEOUT, Client, is_loopback, parse_endpoint
from .errors import (
    AgentplaneError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
    from_status,
)
from .v1 import types_pb2 as types

__all__ = [
    "DEFAULT_TIMEOUT",
    "AgentplaneError",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
    "from_status",
    "is_loopback",
    "parse_endpoint",
    "types",
]
