"""Both servers answer `grpc.reflection.v1alpha`, the only version the
grpcio-reflection package speaks, and a client that has no generated code
builds working stubs from what reflection returns."""

from __future__ import annotations

import re

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def _reflect_and_call(channel: grpc.Channel, service: str, method: str):
    """The services reflection lists, and `method` of `service` called with
    an empty request through stubs built from the reflected descriptors."""
    db = ProtoReflectionDescriptorDatabase(channel)
    services = list(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    m = pool.FindServiceByName(service).FindMethodByName(method)
    request_cls = message_factory.GetMessageClass(m.input_type)
    response_cls = message_factory.GetMessageClass(m.output_type)
    call = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return services, call(request_cls(), timeout=10)


def test_the_control_plane_reflects_v1alpha_and_its_stubs_work(stack):
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(stack.ca.read_bytes()),
        grpc.access_token_call_credentials(stack.token),
    )
    with grpc.secure_channel(stack.address, creds) as channel:
        services, answer = _reflect_and_call(channel, "agentplane.v1.AgentService", "ListAgents")
    assert "agentplane.v1.AgentService" in services, services
    assert "agentplane.v1.HostService" in services, services
    assert answer.DESCRIPTOR.full_name == "agentplane.v1.ListAgentsResponse"


def test_the_host_agent_reflects_v1alpha_and_its_stubs_work(stack):
    # The host agent admits the control plane's certificate only: the one
    # `agentctl dev` made beside the CA.
    pki = stack.ca.parent
    found = re.search(r"host agent \S+ at (\S+)", stack.log.read_text())
    assert found, stack.log_tail()
    creds = grpc.ssl_channel_credentials(
        root_certificates=stack.ca.read_bytes(),
        private_key=(pki / "control-plane.key").read_bytes(),
        certificate_chain=(pki / "control-plane.crt").read_bytes(),
    )
    with grpc.secure_channel(found.group(1), creds) as channel:
        services, answer = _reflect_and_call(channel, "agentplane.v1.HostAgent", "ListAgents")
    assert "agentplane.v1.HostAgent" in services, services
    assert answer.DESCRIPTOR.full_name == "agentplane.v1.HostListAgentsResponse"
