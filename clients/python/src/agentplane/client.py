"""A client of the control plane's AgentService and HostService."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from types import TracebackType
from typing import Iterable, Iterator, Mapping, Optional, Union
from urllib.parse import urlsplit

import grpc
from google.protobuf import duration_pb2

from agentplane.v1 import agent_service_pb2 as agent_pb
from agentplane.v1 import agent_service_pb2_grpc as agent_grpc
from agentplane.v1 import host_service_pb2 as host_pb
from agentplane.v1 import host_service_pb2_grpc as host_grpc
from agentplane.v1 import types_pb2 as types

from .errors import from_rpc_error

PathLike = Union[str, "os.PathLike[str]"]

#: Deadline of each call, as agentctl's --call-timeout.
DEFAULT_TIMEOUT = 30.0


def is_loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback address (agentctl's rule)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_endpoint(endpoint: str) -> tuple[str, str, str]:
    """`https://host:port` or `http://host:port` (no scheme: http, like
    agentctl) → (scheme, host, grpc target "host:port")."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint {endpoint!r}: the scheme must be https:// or http://")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"endpoint {endpoint!r}: only scheme://host:port")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"endpoint {endpoint!r}: {e}") from None
    host = parts.hostname
    if not host or port is None:
        raise ValueError(f"endpoint {endpoint!r}: give host and port, e.g. https://127.0.0.1:7700")
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parts.scheme, host, target


def _read_token(token: Optional[str], token_file: Optional[PathLike]) -> Optional[str]:
    if token is not None and token_file is not None:
        raise ValueError("give token or token_file, not both")
    if token_file is not None:
        lines = Path(token_file).read_text().splitlines()
        token = lines[0] if lines else ""
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ValueError("the token is empty")
    if not token.isascii() or not token.isprintable():
        raise ValueError("a token is printable ASCII")
    return token


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _state(state: Union[None, int, str]) -> int:
    """A filter state from an AgentState value or a name (`running`, `AGENT_STATE_RUNNING`)."""
    if state is None:
        return types.AGENT_STATE_UNSPECIFIED
    if isinstance(state, str):
        name = state.upper()
        if not name.startswith("AGENT_STATE_"):
            name = "AGENT_STATE_" + name
        return types.AgentState.Value(name)
    return int(state)


def _events(stream) -> Iterator[types.Event]:
    try:
        yield from stream
    except grpc.RpcError as e:
        raise from_rpc_error(e) from e
    finally:
        stream.cancel()


class Client:
    """One channel to a control plane; every call carries the token.

    `endpoint` is `https://host:port` (TLS, the server's certificate checked
    against the CA in the file `ca` and against the endpoint's host, or
    `server_name` when given) or `http://host:port` (plaintext: with a token
    only to a loopback address, so a token never crosses a network in the
    clear). `token` or `token_file` (its first line) is sent as
    `authorization: Bearer <token>` on every call. `cert`/`key` present a
    client certificate. `timeout` is each call's deadline in seconds.

    Failed calls raise agentplane.AgentplaneError subclasses (see errors.py).
    """

    def __init__(
        self,
        endpoint: str,
        ca: Optional[PathLike] = None,
        token: Optional[str] = None,
        token_file: Optional[PathLike] = None,
        *,
        server_name: Optional[str] = None,
        cert: Optional[PathLike] = None,
        key: Optional[PathLike] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        scheme, host, target = parse_endpoint(endpoint)
        secret = _read_token(token, token_file)
        if (cert is None) != (key is None):
            raise ValueError("cert and key go together")
        if scheme == "https":
            if ca is None:
                raise ValueError(
                    f"endpoint {endpoint} is https: pass ca (the CA that signs the control plane's certificate)"
                )
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(ca).read_bytes(),
                private_key=Path(key).read_bytes() if key is not None else None,
                certificate_chain=Path(cert).read_bytes() if cert is not None else None,
            )
            options = []
            if server_name:
                # Which name the certificate must carry (and the SNI); the
                # default is the endpoint's host, an IP SAN included.
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(target, creds, options)
        else:
            if secret is not None and not is_loopback(host):
                raise ValueError(
                    f"refusing to send the token in plaintext to {host}: use an https:// endpoint (with ca)"
                )
            if ca is not None or cert is not None or server_name is not None:
                raise ValueError(f"endpoint {endpoint} is plaintext: ca, cert and server_name need https://")
            self._channel = grpc.insecure_channel(target)
        self.endpoint = endpoint
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {secret}"),) if secret is not None else ()
        self._agents = agent_grpc.AgentServiceStub(self._channel)
        self._hosts = host_grpc.HostServiceStub(self._channel)

    @classmethod
    def from_context(cls, name: Optional[str] = None, **kwargs) -> "Client":
        """A client of context `name` (default: the current one) of
        `$XDG_CONFIG_HOME/agentplane/config.toml`, as a plain agentctl
        uses it: its first endpoint, CA, client certificate and token file.
        Other keyword arguments go to the constructor."""
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise RuntimeError("from_context needs Python 3.11 (tomllib) or the tomli package") from None

        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        path = Path(base) / "agentplane" / "config.toml"
        cfg = tomllib.loads(path.read_text())
        name = name or cfg.get("current-context")
        ctx = cfg.get("contexts", {}).get(name or "")
        if not ctx:
            raise ValueError(f"{path}: no context {name!r} (agentctl config get-contexts)")
        return cls(
            ctx["endpoints"][0],
            ca=ctx.get("ca"),
            token_file=ctx.get("token-file"),
            cert=ctx.get("cert"),
            key=ctx.get("key"),
            **kwargs,
        )

    def _call(self, method, request, timeout: Optional[float] = None):
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    # Agents.

    def spawn(
        self,
        command: str,
        args: Iterable[str] = (),
        name: Optional[str] = None,
        labels: Optional[Mapping[str, str]] = None,
        *,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        host: Optional[str] = None,
        selector: Optional[str] = None,
        request_id: Optional[str] = None,
    ) -> types.Agent:
        """Places and starts `command args…` (exec'd directly, no shell);
        returns once it runs (RUNNING) or could not start (FAILED)."""
        spec = types.AgentSpec(
            name=name or "",
            argv=[command, *args],
            env=dict(env or {}),
            cwd=cwd or "",
            labels=dict(labels or {}),
            placement=types.Placement(host=host or "", label_selector=selector or ""),
        )
        req = agent_pb.SpawnAgentRequest(spec=spec, request_id=request_id or "")
        return self._call(self._agents.SpawnAgent, req).agent

    def get(self, id: str) -> types.Agent:
        """The agent's record."""
        return self._call(self._agents.GetAgent, agent_pb.GetAgentRequest(id=id))

    def ls(
        self,
        host: Optional[str] = None,
        state: Union[None, int, str] = None,
        selector: Optional[str] = None,
    ) -> list[types.Agent]:
        """Every agent (all pages), optionally on one host, in one state
        (`"running"` or types_pb2.AGENT_STATE_RUNNING), matching a label
        selector (`"team=a,env=dev"`)."""
        agents: list[types.Agent] = []
        token = ""
        while True:
            page = self._call(
                self._agents.ListAgents,
                agent_pb.ListAgentsRequest(
                    host=host or "",
                    state=_state(state),
                    label_selector=selector or "",
                    page_token=token,
                ),
            )
            agents.extend(page.agents)
            token = page.next_page_token
            if not token:
                return agents

    def stop(self, id: str, grace: Optional[float] = None) -> types.Agent:
        """SIGTERM, then SIGKILL after `grace` seconds (default: the spec's);
        returns the record once the agent ended."""
        req = agent_pb.StopAgentRequest(id=id)
        if grace is not None:
            req.grace.CopyFrom(_duration(grace))
        # The call lasts as long as the grace, and then some.
        return self._call(self._agents.StopAgent, req, timeout=self.timeout + (grace or 0.0))

    def pause(self, id: str) -> types.Agent:
        """SIGSTOP the agent's process group."""
        return self._call(self._agents.PauseAgent, agent_pb.PauseAgentRequest(id=id))

    def resume(self, id: str) -> types.Agent:
        """SIGCONT it."""
        return self._call(self._agents.ResumeAgent, agent_pb.ResumeAgentRequest(id=id))

    def logs(
        self,
        id: str,
        follow: bool = False,
        tail_lines: Optional[int] = None,
    ) -> Iterator[bytes]:
        """The agent's output as it was written, chunk by chunk; with
        `follow`, goes on as it writes more and ends when it ends. `id` may
        be its name. Gaps (output lost to the cap) are skipped."""
        req = agent_pb.StreamLogsRequest(id=id, follow=follow)
        if tail_lines is not None:
            req.tail_lines = tail_lines
        # No deadline on a follow: it lasts as long as the agent.
        stream = self._agents.StreamLogs(
            req, timeout=None if follow else self.timeout, metadata=self._metadata
        )
        try:
            for chunk in stream:
                if chunk.data:
                    yield chunk.data
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            stream.cancel()

    def watch(self, since: Optional[str] = None, agent: Optional[str] = None) -> Iterator[types.Event]:
        """Agent and host events as they happen (from `since`, an event's
        token, when given; only `agent`'s, by id or name, when given). The
        stream is open when this returns, so nothing done after the call is
        missed (iterating it later is fine)."""
        req = agent_pb.WatchAgentsRequest(resume_token=since or "", agent_id=agent or "")
        stream = self._agents.WatchAgents(req, timeout=None, metadata=self._metadata)
        # The stream is open once its first response headers came back.
        try:
            stream.initial_metadata()
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        return _events(stream)

    def rm(self, id: str, force: bool = False) -> None:
        """Deletes an ended agent's record (`force`: stop it first)."""
        self._call(self._agents.DeleteAgent, agent_pb.DeleteAgentRequest(id=id, force=force))

    # Hosts.

    def hosts(self) -> list[types.Host]:
        """Every live host, sorted by id."""
        return list(self._call(self._hosts.ListHosts, host_pb.ListHostsRequest()).hosts)

    # The channel.

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
