"""What a worker tells the driver, and how: the link to the driver's mailbox, the request
for its group's plan, and the figures each step reports (gradient norm, memory, bytes sent,
the host's facts).
"""

from __future__ import annotations

import os
import platform
import resource
import time

from swarm.train.mailbox import GroupKey, group_key, pack, unpack


class DriverLink:
    """Rank 0's line to the driver (a ``swarm.train.mailbox`` actor), built so that a
    training step never waits on it.

    Metrics go out fire-and-forget; the stop request is polled with a probe that is
    read only once Ray has its answer. The mailbox answers every message with its stop
    flag, and that answer is the next probe: a run that logs every step makes one call to
    the driver per step, not two (on a home link, each call is a few kB of gRPC and Ray's
    task events). Checkpoints and the final adapter use ``deliver``, which waits until
    the mailbox holds them.
    """

    def __init__(self, mailbox):
        import ray

        self._ray, self.mailbox = ray, mailbox
        self._stop_probe = None  # a reference to the stop flag, not yet read
        self.calls = 0  # calls made to the mailbox

    def send(self, message: dict) -> None:
        answer = self._call(self.mailbox.send, pack(message))
        if self._stop_probe is None:
            self._stop_probe = answer

    def deliver(self, message: dict) -> None:
        self._ray.get(self._call(self.mailbox.deliver, pack(message), message["kind"] == "checkpoint"))

    def stop_requested(self) -> bool:
        if self._stop_probe is None:  # no message since the last answer was read
            self._stop_probe = self._call(self.mailbox.stop_requested)
        ready, _ = self._ray.wait([self._stop_probe], timeout=0)
        if not ready:
            return False
        stop, self._stop_probe = self._ray.get(self._stop_probe), None
        return stop

    def _call(self, method, *args):
        self.calls += 1
        return method.remote(*args)


def group_plan(mailbox, link: DriverLink | None, rank: int, world: int, local: bool) -> tuple[dict, list[str]]:
    """This worker group's plan from the driver (see ``swarm.train.driver.plans``), the same on every
    rank, and each rank's node address.

    Collective: every rank gathers the node addresses of the group; rank 0 asks the driver
    for the group's plan and hands it to the others (as JSON: nothing received is unpickled).
    """
    import ray

    from swarm.train.worker import collectives

    addresses = collectives.all_gather_json(ray.util.get_node_ip_address())
    answer = None
    if rank == 0:
        key = group_key(addresses, local)
        answer = receive_group_plan(mailbox, key, ask=lambda: link.send({"kind": "plan_request", "key": key}))
    return collectives.broadcast_json(answer, src=0), addresses


def receive_group_plan(mailbox, key: GroupKey, ask, timeout_s: float = 300.0) -> dict:
    """Rank 0's side: the plan (``Plan.to_dict()``) of its group, or ``{"refused": line}``.

    Args:
        mailbox: the run's mailbox actor.
        key: this group's key.
        ask: sends the driver a request for ``key`` (only called when the mailbox has none).
        timeout_s: how long to wait for the driver's answer.
    """
    import ray

    packed = ray.get(mailbox.plan.remote(key))
    if packed is None:
        ask()
        deadline = time.monotonic() + timeout_s
        while packed is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the driver did not plan worker group {key} within {timeout_s:.0f} s")
            time.sleep(0.2)
            packed = ray.get(mailbox.plan.remote(key))
    return unpack(packed)


def plan_of_pc(plan: dict, address: str) -> dict:
    """What a worker of a ``diloco`` run uses: its PC's own plan inside the run's plan.

    Its PC's DeepSpeed config, strategy, micro-batch and accumulation replace the run's;
    the precision, placement and the exchange (``sync``) stay the run's.
    """
    pcs = plan["pcs"]
    # A run on its own Ray has one PC, whose address the plan never learned.
    [pc] = pcs if len(pcs) == 1 else [pc for pc in pcs if pc["address"] == address]
    return {**plan, "deepspeed": pc["deepspeed"], "strategy": pc["strategy"], "micro_batch": pc["micro_batch"],
            "grad_accum": pc["grad_accum"], "pc": pc["name"]}


def gather_hosts(on_gpu: bool) -> list[dict]:
    """Every rank's ``host_facts``, in rank order. Collective."""
    from swarm.train.worker import collectives

    return collectives.all_gather_json(host_facts(on_gpu))


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)


def memory_figures(on_gpu: bool) -> dict:
    import torch

    figures = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if on_gpu:
        figures["peak_device_bytes"] = torch.cuda.max_memory_allocated()
    return figures


def host_facts(on_gpu: bool) -> dict:
    import psutil
    import torch

    gpus = []
    if on_gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpus.append({"name": props.name, "vram_bytes": props.total_memory})
    import ray

    return {
        "hostname": platform.node(), "address": ray.util.get_node_ip_address(), "gpus": gpus,
        "ram_bytes": psutil.virtual_memory().total, "cpu_threads": torch.get_num_threads(),
    }


def sent_bytes_counter():
    """A function giving the bytes this host has sent on the training interface so far.

    The interface is the one the collectives use: the one the node's agent named for gloo/NCCL (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``, set
    on every swarm node), else the one holding this node's address. The count is the
    host's (a home PC runs one worker per GPU, whose traffic it adds up), and it includes
    the little that Ray itself sends.
    """
    import psutil
    import ray

    name = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")
    if not name:
        address = ray.util.get_node_ip_address()
        name = next(
            (nic for nic, addrs in psutil.net_if_addrs().items() if any(a.address == address for a in addrs)), None
        )

    def sent() -> int:
        counters = psutil.net_io_counters(pernic=True).get(name) if name else None
        return counters.bytes_sent if counters else 0

    return sent
