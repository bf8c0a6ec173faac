"""The committed agent_pb2.py is what protoc makes from agent.proto today."""

from __future__ import annotations

from swarm.cluster.messages import SERVICE
from swarm.cluster.proto import regen
from swarm.cluster.proto import agent_pb2


def test_generated_module_matches_the_proto(tmp_path):
    fresh = regen.generate(tmp_path).read_text()
    committed = (regen.HERE / regen.GENERATED).read_text()
    assert committed == fresh, "agent_pb2.py is stale: run python -m swarm.cluster.proto.regen"


def test_regen_check_passes():
    assert regen.main(["--check"]) == 0


def test_every_rpc_has_a_message_class_and_an_agent_method():
    from swarm.cluster.agent import AgentService
    from swarm.cluster.server import _snake

    names = [m.name for m in SERVICE.methods]
    assert names[0] == "Challenge" and {"Health", "Inventory", "StartRay", "StopRay"} <= set(names)
    for method in SERVICE.methods:
        assert hasattr(agent_pb2, method.input_type.name) and hasattr(agent_pb2, method.output_type.name)
        if method.name != "Challenge":
            assert callable(getattr(AgentService, _snake(method.name)))
