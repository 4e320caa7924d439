"""The client against a real `agentctl dev` stack (see conftest.py): TLS
verified against the stack's CA, the admin token on every call."""

from __future__ import annotations

import time

import grpc
import pytest

import agentplane
from agentplane.v1 import types_pb2 as t

#: A well-formed token that is not the stack's (its token is 64 hex digits too).
WRONG_TOKEN = "0" * 64
#: How long a spawned agent may take to show RUNNING.
RUNNING_LIMIT = 20.0


def admin(stack, **kw) -> agentplane.Client:
    return agentplane.Client(stack.endpoint, ca=stack.ca, token_file=stack.token_file, **kw)


def state(agent) -> str:
    return t.AgentState.Name(agent.state)


def test_admin_sees_the_host_and_runs_an_agent(stack):
    with admin(stack) as c:
        hosts = c.hosts()
        assert [h.id for h in hosts] == ["dev"], hosts
        assert hosts[0].address and not hosts[0].cordoned

        a = c.spawn("sleep", ["30"], name="py-sleep", labels={"suite": "python"})
        assert a.id and a.host == "dev", a
        deadline = time.monotonic() + RUNNING_LIMIT
        while (got := c.get(a.id)).state != t.AGENT_STATE_RUNNING:
            assert got.state == t.AGENT_STATE_PENDING, f"{a.id} is {state(got)}: {got.exit.error}"
            assert time.monotonic() < deadline, f"{a.id} not RUNNING within {RUNNING_LIMIT} s"
            time.sleep(0.05)
        assert list(got.spec.argv) == ["sleep", "30"]
        assert got.spec.name == "py-sleep"
        assert dict(got.spec.labels) == {"suite": "python"}
        assert got.pid > 0

        assert a.id in [x.id for x in c.ls()]
        assert a.id in [x.id for x in c.ls(state="running", selector="suite=python")]
        assert a.id not in [x.id for x in c.ls(selector="suite=other")]

        stopped = c.stop(a.id, grace=5)
        assert stopped.state == t.AGENT_STATE_EXITED, state(stopped)
        assert stopped.exit.reason == t.EXIT_REASON_STOPPED, t.ExitReason.Name(stopped.exit.reason)
        assert c.get(a.id).state == t.AGENT_STATE_EXITED
        assert a.id not in [x.id for x in c.ls(state="running")]

        c.rm(a.id)
        with pytest.raises(agentplane.NotFound) as e:
            c.get(a.id)
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_server_name_override_is_checked(stack):
    # The certificate carries control-plane.agentplane: accepted in place of
    # the IP the endpoint names ...
    with admin(stack, server_name="control-plane.agentplane") as c:
        assert [h.id for h in c.hosts()] == ["dev"]
    # ... and a name it does not carry fails the handshake.
    with admin(stack, server_name="evil.example", timeout=10) as c:
        with pytest.raises(agentplane.Unavailable):
            c.hosts()


def test_another_ca_is_not_trusted(stack):
    # The host agent's certificate is not a CA, let alone the one that signed
    # the control plane's.
    other = stack.ca.parent / "host.crt"
    assert other.is_file()
    with agentplane.Client(stack.endpoint, ca=other, token_file=stack.token_file, timeout=10) as c:
        with pytest.raises(agentplane.Unavailable):
            c.hosts()


def test_a_wrong_token_is_unauthenticated(stack):
    assert WRONG_TOKEN != stack.token
    with agentplane.Client(stack.endpoint, ca=stack.ca, token=WRONG_TOKEN) as c:
        with pytest.raises(agentplane.Unauthenticated) as e:
            c.hosts()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert isinstance(e.value, agentplane.AgentplaneError)
        with pytest.raises(agentplane.Unauthenticated):
            c.ls()


def test_no_token_is_unauthenticated(stack):
    with agentplane.Client(stack.endpoint, ca=stack.ca) as c:
        with pytest.raises(agentplane.Unauthenticated) as e:
            c.hosts()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(agentplane.Unauthenticated):
            c.spawn("true")


def test_plaintext_to_the_tls_port_gets_no_answer(stack):
    # Loopback, so the client lets the token go in plaintext; the server
    # speaks only TLS and answers nothing.
    with agentplane.Client(f"http://{stack.address}", token=stack.token, timeout=10) as c:
        with pytest.raises(agentplane.Unavailable) as e:
            c.hosts()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
