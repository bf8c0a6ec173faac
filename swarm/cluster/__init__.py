"""Several PCs as one Ray cluster: the node agent, its wire format, bring-up and tear-down.

- ``constants``: every pinned port. ``builders``: pure ``ray start`` argv/env, interface
  choice, version checks. ``spec``: the cluster file.
- ``auth``: HMAC challenge-response of agent calls. ``proto/``: ``agent.proto`` and its
  generated ``agent_pb2``. ``messages``: wire <-> ``NodeInventory``.
- ``server`` / ``agent``: the gRPC agent (``swarm agent``). ``client``: signed calls, and the
  environment a Ray client needs. ``raynode`` / ``procs``: one Ray node as a process tree.
- ``bringup``: ``swarm up`` / ``swarm down``; ``join``: ``swarm join``; ``state``: the
  recorded swarm and its live status; ``commands``: what those verbs print.

Test hosts in network namespaces (``NetLab``) live in tests/lab/, beside the tests and
benchmarks that use them.
"""
