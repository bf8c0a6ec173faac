"""The agent's wire format: ``agent.proto`` and the ``agent_pb2`` module protoc makes from it.

``agent_pb2.py`` is generated; regenerate it with ``python -m swarm.cluster.proto.regen`` (a
unit test checks that the committed file matches the .proto).
"""
