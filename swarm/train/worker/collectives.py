"""Every torch.distributed call swarm makes, in one place: tensors only, each on its group's device.

NCCL has rules that gloo does not enforce, so a run on CPUs never meets them:

- every tensor a collective gets must be on the current CUDA device, in every group (groups
  made with ``new_group`` inherit NCCL; a CPU tensor raises "No backend type associated with
  device type cpu", even in a group of one);
- the current device must be set before the first collective (NCCL creates its communicator
  on it; left at 0, every worker of a PC lands on GPU 0 and NCCL refuses the group).

And torch's object collectives (``all_gather_object``, ``broadcast_object_list``) unpickle
what arrives: whoever joins a run's store from the LAN could run code on every PC. So
nothing here sends objects. Numbers travel as float64 tensors; text (addresses, host facts,
plans) as UTF-8 JSON in uint8 tensors, read back with ``json``, which builds only dicts,
lists, strings and numbers.

Callers keep their tensors where they want them (mostly host memory) and get each result
back there; this module places every tensor on its group's device first. ``join`` sets that
device (``torch.cuda.set_device``) before the process group exists, and every call refuses
to run before it. Groups made with ``new_group(on_host=True)`` run gloo on host tensors
beside NCCL: diloco's exchange between PCs, whose state lives in host RAM
(``swarm.train.worker.diloco``).

The run's rendezvous store (``rendezvous_store``) listens on rank 0's swarm address only,
where torch's own would listen on every address of the PC.

tests/unit/test_collectives.py holds these rules on the CPU: a recording torch.distributed
that plays NCCL checks the device of every tensor that reaches it, and a static check finds
no other module of swarm that imports torch.distributed.
"""

from __future__ import annotations

import json
import socket

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

_device: torch.device | None = None  # the default group's device, set by join
_host_groups: list = []  # groups running gloo on host tensors (compared by identity)


class CollectiveOrderError(RuntimeError):
    """A collective was called before ``join`` set the process's device."""


def join(backend: str, device: str, **init_kwargs) -> None:
    """Set this process's device, then join (or reuse) the default process group.

    Args:
        backend: ``nccl`` or ``gloo``.
        device: this worker's device (``cpu`` or ``cuda:N``); NCCL's collectives run there.
        init_kwargs: passed to ``torch.distributed.init_process_group`` (rank, world_size,
            init_method, timeout); ignored when the group exists already (DeepSpeed made it).
    """
    global _device
    place = torch.device(device)
    if place.type == "cuda":
        _set_cuda_device(place)
    _device = place
    _host_groups.clear()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **init_kwargs)


def rendezvous_store(address: str, port: int, rank: int, world_size: int, timeout):
    """The run's torch store (``join(store=...)``), which rank 0 serves on ``address`` only.

    Args:
        address: rank 0's address on the swarm (its Ray node address).
        port: a free port there.
        rank, world_size: this worker's rank, and how many join.
        timeout: a ``datetime.timedelta``, as ``init_process_group`` takes it.

    torch's own store (``init_method="env://"``) listens on every address of rank 0's PC, and
    answers anyone who reaches it; here rank 0 binds the socket itself and hands it to torch.
    Gloo and NCCL bind their own sockets to the swarm's interface (``GLOO_SOCKET_IFNAME``,
    ``NCCL_SOCKET_IFNAME``, set on every node by ``swarm.cluster.builders.ray_node_env``).
    """
    if rank != 0:
        return dist.TCPStore(address, port, world_size, False, timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(1024)
    # detach(): the store owns the socket from now on (a closed Python socket would close it).
    return dist.TCPStore(address, port, world_size, True, timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


def leave() -> None:
    """Leave the process group (when this process made or joined one) and forget the device."""
    global _device
    if dist.is_initialized():
        dist.destroy_process_group()
    _device = None
    _host_groups.clear()


def _set_cuda_device(device: torch.device) -> None:
    torch.cuda.set_device(device)


def _place(tensor, device: torch.device):
    """``tensor`` on ``device`` (the same tensor when it is there already)."""
    return tensor.to(device)


def device_of(group=None) -> torch.device:
    """The device a collective of ``group`` (None: the default group) runs on."""
    if _device is None:
        raise CollectiveOrderError(
            "a torch collective before swarm.train.worker.collectives.join set the device: with NCCL every "
            "worker would take GPU 0")
    if group is not None and any(group is g for g in _host_groups):
        return torch.device("cpu")
    return _device


def new_group(ranks: list[int], on_host: bool = False):
    """A process group of ``ranks`` (every rank must call it, in the same order).

    Args:
        on_host: the group runs gloo on host tensors, whatever the default group's backend.
    """
    device_of()  # refuses before join
    group = dist.new_group(ranks, backend="gloo" if on_host else None)
    if on_host:
        _host_groups.append(group)
    return group


def all_reduce(tensor, op: str = "sum", group=None):
    """The reduction of ``tensor`` over ``group``, returned where ``tensor`` is."""
    work = _place(tensor, device_of(group))
    dist.all_reduce(work, op=OPS[op], group=group)
    return _place(work, tensor.device)


def reduce_numbers(values: list[float], op: str = "sum", group=None) -> list[float]:
    """``values`` reduced element-wise over ``group`` (float64)."""
    return all_reduce(torch.tensor(values, dtype=torch.float64), op, group).tolist()


def broadcast(tensor, src: int, group=None):
    """Global rank ``src``'s ``tensor`` on every rank of ``group``, returned where ``tensor`` is."""
    work = _place(tensor, device_of(group))
    dist.broadcast(work, src=src, group=group)
    return _place(work, tensor.device)


def all_gather(tensor, group=None) -> list:
    """Every rank's ``tensor`` (all of one shape and dtype), in group rank order, where ``tensor`` is."""
    device = device_of(group)
    work = _place(tensor, device)
    gathered = [_place(torch.empty_like(tensor, device="cpu"), device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, work, group=group)
    return [_place(t, tensor.device) for t in gathered]


def gather(tensor, dst: int, group=None) -> list | None:
    """Every rank's ``tensor`` (all of one shape and dtype) on global rank ``dst``, in group rank
    order, where ``tensor`` is; None on the other ranks (each sends its tensor once)."""
    device = device_of(group)
    work = _place(tensor, device)
    if dist.get_rank() != dst:
        dist.gather(work, None, dst=dst, group=group)
        return None
    gathered = [_place(torch.empty_like(tensor, device="cpu"), device) for _ in range(dist.get_world_size(group))]
    dist.gather(work, gathered, dst=dst, group=group)
    return [_place(t, tensor.device) for t in gathered]


def _bytes_tensor(data: bytes, size: int):
    """``data`` as a uint8 tensor of ``size`` elements, zero-padded."""
    buffer = torch.zeros(size, dtype=torch.uint8)
    if data:
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buffer


def all_gather_bytes(data: bytes, group=None) -> list[bytes]:
    """Every rank's ``data``, in group rank order."""
    sizes = [int(n.item()) for n in all_gather(torch.tensor([len(data)], dtype=torch.int64), group)]
    gathered = all_gather(_bytes_tensor(data, max(sizes)), group)
    return [t[:n].numpy().tobytes() for t, n in zip(gathered, sizes)]


def broadcast_bytes(data: bytes | None, src: int, group=None) -> bytes:
    """Global rank ``src``'s ``data`` on every rank of ``group`` (the others pass None)."""
    mine = data if dist.get_rank() == src else b""
    size = int(broadcast(torch.tensor([len(mine)], dtype=torch.int64), src, group).item())
    return broadcast(_bytes_tensor(mine, size), src, group).numpy().tobytes()


def all_gather_json(value, group=None) -> list:
    """Every rank's ``value`` (plain JSON data: tuples arrive as lists), in group rank order."""
    return [json.loads(b) for b in all_gather_bytes(json.dumps(value).encode(), group)]


def broadcast_json(value, src: int, group=None):
    """Global rank ``src``'s ``value`` (plain JSON data) on every rank of ``group``, ``src`` included,
    as JSON reads it back: every rank holds the same (tuples arrive as lists)."""
    return json.loads(broadcast_bytes(json.dumps(value).encode() if dist.get_rank() == src else None, src, group))
