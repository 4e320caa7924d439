"""The generated agentplane.v1 messages and stubs.

Filled at build time from the repository's proto/agentplane/v1/*.proto
(see setup.py): types_pb2, agent_service_pb2(_grpc),
host_service_pb2(_grpc) and host_agent_pb2(_grpc).
"""
