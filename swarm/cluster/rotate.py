"""A way back after a leak: a new cluster secret, taken by every PC through its agent.

``swarm token --rotate`` on the head makes a new secret and sends it to each agent of the
swarm sealed with a key derived from the current secret, in a call signed with the current
agent key (``swarm.cluster.keys.seal_secret``, the agent's ``Rekey``). Each agent stops its
Ray node (which runs with the old token), saves the new secret and checks every later call
with the new keys. The head then makes a new CA, so the certificates issued so far name
nothing a node accepts, and starts the swarm again: new token, new certificates. The old
token, the old agent key and the old certificates open nothing after that.

What rotation cannot do: a person who holds the old *secret* and sits between the head and a
PC while it rotates could read the new one (the agents' channel is trusted through the secret).
After the secret itself leaked, copy the new one to each PC by hand, as at set-up.
"""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

from swarm.cluster import builders, keys, tls
from swarm.cluster.client import AgentCallError, AgentClient
from swarm.cluster.proto import agent_pb2 as pb
from swarm.errors import UserError
from swarm.home import SECRET_BYTES, home_dir, secret_path, write_private


def rekey_nodes(nodes: list[dict], current: str, new: str, say=print) -> list[str]:
    """Give every node's agent the ``new`` secret; workers first, the head last.

    Args:
        nodes: ``{"address", "agent", "role"}`` records (``cluster.json``'s ``nodes``).
        current: the secret the agents hold now.
        new: the secret they take.
        say: where one line per node goes.

    Returns:
        One line per node that did not take it (``node ADDRESS: why``).
    """
    sealed = keys.seal_secret(current, new)
    failures: list[str] = []

    def rekey(node: dict) -> None:
        try:
            with AgentClient(node["agent"], current) as client:
                reply = client.call("Rekey", pb.RekeyRequest(sealed_secret=sealed), pb.RekeyReply, timeout_s=60)
            stopped = ", its Ray node stopped" if reply.was_running else ""
            say(f"{node.get('role', 'node')} {node['address']}: new secret{stopped}")
        except AgentCallError as exc:
            failures.append(f"node {node['address']}: {exc}")

    with_agent = [n for n in nodes if n.get("agent")]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(rekey, [n for n in with_agent if n.get("role") != builders.HEAD]))
    for node in with_agent:
        if node.get("role") == builders.HEAD:
            rekey(node)
    return failures


def rotate(nodes: list[dict], current: str, say=print) -> tuple[str, list[str]]:
    """Re-key ``nodes`` and this PC (the head): a new secret and a new CA.

    Returns:
        The new secret, and one line per node that did not take it.

    Raises:
        UserError: this PC has no CA (rotate on the head), or the head's agent refused.
    """
    tls.load_ca()  # fail before any PC changes: only the head can issue the new certificates
    new = secrets.token_hex(SECRET_BYTES)
    failures = rekey_nodes(nodes, current, new, say)
    head = [n for n in nodes if n.get("role") == builders.HEAD and n.get("agent")]
    if head and any(line.startswith(f"node {head[0]['address']}:") for line in failures):
        # The workers hold the new secret already; keep it here too so the user can finish by hand.
        _save(new)
        raise UserError(f"the head's agent did not take the new secret ({'; '.join(failures)}); "
                        f"the new secret is in {secret_path()}: restart the head's agent and run `swarm up`")
    _save(new)
    tls.create_ca(overwrite=True)
    return new, failures


def _save(secret: str) -> None:
    home_dir()
    write_private(secret_path(), (secret + "\n").encode())
