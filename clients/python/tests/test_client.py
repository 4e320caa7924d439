"""The client's own rules, without a server: endpoints, tokens, errors."""

from __future__ import annotations

import grpc
import pytest

import agentplane
from agentplane import client as client_mod


@pytest.fixture
def no_channels(monkeypatch):
    """Fails the test if the client opens any channel."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a channel was opened: {args}")

    monkeypatch.setattr(client_mod.grpc, "insecure_channel", refuse)
    monkeypatch.setattr(client_mod.grpc, "secure_channel", refuse)


@pytest.mark.parametrize(
    "endpoint",
    ["http://10.0.0.5:7700", "http://control-plane.example:7700", "10.0.0.5:7700", "http://[fd00::5]:7700"],
)
def test_a_token_never_goes_in_plaintext_beyond_loopback(endpoint, no_channels, tmp_path):
    with pytest.raises(ValueError, match="plaintext"):
        agentplane.Client(endpoint, token="s3cret")
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with pytest.raises(ValueError, match="plaintext"):
        agentplane.Client(endpoint, token_file=token_file)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:7700", "http://[::1]:7700", "localhost:7700", "http://127.0.0.2:1"])
def test_a_token_may_go_in_plaintext_to_loopback(endpoint):
    # Channels are lazy: nothing is dialled until a call.
    agentplane.Client(endpoint, token="s3cret").close()


def test_https_needs_a_ca(no_channels):
    with pytest.raises(ValueError, match="pass ca"):
        agentplane.Client("https://10.0.0.5:7700", token="s3cret")


@pytest.mark.parametrize("endpoint", ["ftp://127.0.0.1:1", "https://127.0.0.1", "https://127.0.0.1:1/x", "http://:7700"])
def test_bad_endpoints_are_refused(endpoint, no_channels):
    with pytest.raises(ValueError, match="endpoint"):
        agentplane.Client(endpoint)


def test_token_rules(tmp_path, no_channels):
    with pytest.raises(ValueError, match="not both"):
        agentplane.Client("http://127.0.0.1:1", token="a", token_file=tmp_path / "t")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        agentplane.Client("http://127.0.0.1:1", token_file=empty)
    with pytest.raises(ValueError, match="ASCII"):
        agentplane.Client("http://127.0.0.1:1", token="caf\u00e9")


def test_the_token_file_gives_its_first_line(tmp_path):
    f = tmp_path / "token"
    f.write_text("  abc123  \nsecond line\n")
    c = agentplane.Client("http://127.0.0.1:1", token_file=f)
    try:
        assert c._metadata == (("authorization", "Bearer abc123"),)
    finally:
        c.close()


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.UNAUTHENTICATED, agentplane.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, agentplane.PermissionDenied),
        (grpc.StatusCode.NOT_FOUND, agentplane.NotFound),
        (grpc.StatusCode.UNAVAILABLE, agentplane.Unavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, agentplane.FailedPrecondition),
        (grpc.StatusCode.INTERNAL, agentplane.AgentplaneError),
    ],
)
def test_status_codes_map_to_exceptions(code, cls):
    class Failed(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "the message"

    e = agentplane.from_rpc_error(Failed())
    assert type(e) is cls
    assert isinstance(e, agentplane.AgentplaneError)
    assert (e.code, e.message) == (code, "the message")
    assert str(e) == f"{code.name}: the message"
