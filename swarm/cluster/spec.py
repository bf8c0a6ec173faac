"""The cluster file that ``swarm up`` reads: the head's address, each agent's, Ray settings."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from swarm.cluster.client import agent_address
from swarm.cluster.constants import MIN_OBJECT_STORE_BYTES, WORKER_SLOT_RESOURCE
from swarm.config.loading import describe_validation_error
from swarm.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NodeSpec(_Section):
    """One PC: its LAN address, where its agent listens, and per-node Ray settings."""

    address: str = Field(description="IPv4 address the other PCs reach this one at")
    agent: str | None = Field(None, description="HOST:PORT of its agent (default ADDRESS:7077)")
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: ByteSize | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    train: bool = Field(True, description="run training workers here (false: e.g. a head PC that only coordinates)")

    @field_validator("address")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError("must be an IPv4 address such as 192.168.1.10 (Ray nodes are addressed by IP)") from None

    @field_validator("agent")
    @classmethod
    def _agent(cls, value: str | None) -> str | None:
        try:
            return None if value is None else agent_address(value)
        except UserError as exc:
            raise ValueError(str(exc)) from None

    @property
    def agent_address(self) -> str:
        return self.agent or agent_address(self.address)


class RaySpec(_Section):
    """Defaults for every node; a node's own keys win."""

    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    object_store_memory: ByteSize | None = Field(None, description="bytes or e.g. 2GiB; default 10% of RAM, at most 4GiB")
    resources: dict[str, float] = Field(default_factory=dict)
    metrics: bool = Field(False, description="open Ray's Prometheus endpoints (ports 6384-6386, no authentication, every address)")


LOOPBACK = ("127.0.0.1", "localhost")


class DashboardSpec(_Section):
    host: str = Field("127.0.0.1", description="where the dashboard listens: 127.0.0.1 (reach it through ssh -L) or the head's address")
    insecure_plain_http: bool = Field(
        False, description="allow a host other than loopback: the dashboard speaks plain HTTP, so Ray's token "
        "(which lets its holder run code on every PC) crosses the LAN in clear text")

    @model_validator(mode="after")
    def _loopback_unless_told(self) -> "DashboardSpec":
        if self.host not in LOOPBACK and not self.insecure_plain_http:
            raise ValueError(
                f"dashboard.host {self.host} would send Ray's token over the LAN in plain HTTP (anyone "
                "listening could then run code on every PC); keep 127.0.0.1 and open it with "
                "`ssh -L 8265:127.0.0.1:8265 HEAD-PC`, or set dashboard.insecure_plain_http: true")
        return self


class ClusterSpec(_Section):
    """A whole ``cluster.yaml``."""

    head: NodeSpec
    workers: list[NodeSpec] = Field(default_factory=list)
    ray: RaySpec = Field(default_factory=RaySpec)
    dashboard: DashboardSpec = Field(default_factory=DashboardSpec)

    @model_validator(mode="after")
    def _checks(self) -> "ClusterSpec":
        seen = [self.head.address] + [w.address for w in self.workers]
        dupes = sorted({a for a in seen if seen.count(a) > 1})
        if dupes:
            raise ValueError(f"address {dupes[0]} is listed twice; each PC appears once")
        for node in [self.head, *self.workers]:
            size = node.object_store_memory or self.ray.object_store_memory
            if size is not None and size < MIN_OBJECT_STORE_BYTES:
                raise ValueError(f"object_store_memory of {node.address} is below {MIN_OBJECT_STORE_BYTES} bytes (100MiB)")
        return self

    def merged(self, node: NodeSpec) -> dict:
        """The node's Ray settings with the cluster-wide defaults filled in."""
        return {
            "num_cpus": node.num_cpus if node.num_cpus is not None else self.ray.num_cpus,
            "num_gpus": node.num_gpus if node.num_gpus is not None else self.ray.num_gpus,
            "object_store_bytes": int(node.object_store_memory or self.ray.object_store_memory or 0),
            "resources": {**self.ray.resources, **node.resources,
                          **({} if node.train else {WORKER_SLOT_RESOURCE: 0.0})},
        }


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file.

    Raises:
        UserError: a missing or malformed file, an unknown key, or an invalid value.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cluster file {path} does not exist (see configs/cluster.yaml for an example)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None
