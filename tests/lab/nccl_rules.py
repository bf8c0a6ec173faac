"""NCCL's rules, enforced on a machine without a GPU.

On the CPU a worker's device is the CPU, so a rule "tensors on the worker's device" passes
everything, and gloo accepts whatever it gets. ``NcclStandIn`` plays a one-GPU PC instead:

- ``torch.cuda.set_device`` and ``device_count`` answer as on a PC with one card, and the
  call is recorded;
- ``Tensor.to("cuda:N")`` gives a copy tagged as living on that card (``OnCard``; its data
  stays in host memory), and moving it back gives a plain tensor, as a real copy would;
- torch.distributed's functions are wrapped (DeepSpeed's own calls run unchecked: its CPU
  accelerator rightly uses host tensors here): every call is recorded with the device of each
  tensor it got, checked against what NCCL demands (the current card, for every group whose
  backend is NCCL, the groups made by ``new_group`` without a backend included; host memory
  for gloo groups), then run for real by gloo on the untagged data.

What it finds is in ``violations``: a tensor on the wrong device, a collective before
``set_device``, an object collective (NCCL runs it on the current card, and it unpickles
what other hosts send). It patches the ``torch.distributed`` module itself, so it holds any
code, whichever way it calls torch.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv", "barrier")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")


class OnCard(torch.Tensor):
    """A tensor that stands for one on a CUDA card (``card``); its data is in host memory."""

    card: torch.device


def where(tensor) -> torch.device:
    return getattr(tensor, "card", None) or tensor.device


def _cuda_target(args, kwargs) -> torch.device | None:
    for value in (kwargs.get("device"), *args):
        if isinstance(value, (str, torch.device)):
            device = torch.device(value)
            return device if device.type == "cuda" else None
    return None


class NcclStandIn:
    """A one-GPU PC on this CPU, with NCCL as the process group's backend. Use with
    ``monkeypatch``: ``stand_in = NcclStandIn(monkeypatch)``; ``stand_in.violations`` after."""

    def __init__(self, monkeypatch, gpus: int = 1):
        self.events: list[tuple] = []
        self.violations: list[str] = []
        self.current: torch.device | None = None
        self.default_backend: str | None = None
        self._group_backends: dict[int, str] = {}
        self._groups: list = []  # keeps the groups alive, so their ids stay theirs
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = _cuda_target(args, kwargs)
            if target is not None:
                if target.index is None:
                    target = torch.device("cuda", self.current.index if self.current else 0)
                if isinstance(tensor, OnCard) and tensor.card == target:
                    return tensor
                rest = [a for a in args if not isinstance(a, (str, torch.device))]
                kwargs = {k: v for k, v in kwargs.items() if k != "device"}
                plain = tensor.as_subclass(torch.Tensor)
                moved = real_to(plain, *rest, **kwargs).clone().as_subclass(OnCard)
                moved.card = target
                return moved
            if isinstance(tensor, OnCard):  # back to the host: a plain copy
                return real_to(tensor.as_subclass(torch.Tensor).clone(), *args, **kwargs)
            return real_to(tensor, *args, **kwargs)

        def set_device(device) -> None:
            self.current = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            self.events.append(("set_device", str(self.current)))

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current.index if self.current else 0)
        real_init, real_new_group = dist.init_process_group, dist.new_group

        def init_process_group(backend=None, *args, **kwargs):
            self.default_backend = backend
            self.events.append(("init_process_group", backend))
            kwargs.pop("device_id", None)
            real_init("gloo", *args, **kwargs)

        def new_group(ranks=None, *args, backend=None, **kwargs):
            group = real_new_group(ranks, *args, backend="gloo", **kwargs)
            self._group_backends[id(group)] = backend or self.default_backend
            self._groups.append(group)
            self.events.append(("new_group", backend or self.default_backend))
            return group

        monkeypatch.setattr(dist, "init_process_group", init_process_group)
        monkeypatch.setattr(dist, "new_group", new_group)
        for name in COLLECTIVES:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, self._wrap(name, getattr(dist, name)))
        for name in OBJECT_COLLECTIVES:
            monkeypatch.setattr(dist, name, self._wrap_object(name, getattr(dist, name)))

    def backend_of(self, group) -> str | None:
        return self._group_backends.get(id(group), self.default_backend) if group is not None else self.default_backend

    def collectives(self) -> list[tuple]:
        """The recorded collectives: (name, backend, devices of the tensors it got)."""
        return [e for e in self.events if e[0] not in ("set_device", "init_process_group", "new_group")]

    def _check(self, name: str, tensors: list, group) -> None:
        backend = self.backend_of(group)
        devices = [str(where(t)) for t in tensors]
        self.events.append((name, backend, devices))
        if backend != "nccl":
            expected = "cpu"
        elif self.current is None:
            self.violations.append(f"{name} on an NCCL group before torch.cuda.set_device")
            expected = "cuda:0"  # where NCCL then runs it, whichever card the worker has
        else:
            expected = str(self.current)
        wrong = [d for d in devices if d != expected]
        if wrong:
            self.violations.append(f"{name} on a {backend} group got tensors on {wrong}, not {expected}")

    def _wrap(self, name: str, real):
        def call(*args, **kwargs):
            if _called_from_deepspeed():
                # DeepSpeed's own collectives: on this CPU its accelerator is the CPU, so its
                # tensors are rightly on the host. Run, not checked.
                return real(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})
            group = kwargs.get("group")
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            for a in (*args, *kwargs.values()):
                if isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            self._check(name, tensors, group)
            plain = [_plain(a) for a in args]
            return real(*plain, **{k: _plain(v) for k, v in kwargs.items()})

        return call

    def _wrap_object(self, name: str, real):
        def call(*args, **kwargs):
            self.events.append((name, self.backend_of(kwargs.get("group")), []))
            self.violations.append(f"{name}: an object collective (runs on the current card, unpickles what arrives)")
            return real(*args, **kwargs)

        return call


def _called_from_deepspeed() -> bool:
    """Whether the nearest caller outside torch.distributed and this module is DeepSpeed's code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in name and not name.endswith("nccl_rules.py"):
            return f"{os.sep}deepspeed{os.sep}" in name
        frame = frame.f_back
    return False


def _plain(value):
    if isinstance(value, OnCard):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_rendezvous() -> None:
    """torch's env:// variables (and DeepSpeed's LOCAL_RANK) for a world of one on this machine."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
