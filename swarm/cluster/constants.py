"""Every port swarm and its Ray nodes listen on, in one place.

Ray picks most of its ports at random unless told otherwise; swarm pins all of them so that a
user can write one firewall rule per PC, and keeps Ray's unauthenticated metrics endpoints
closed unless asked. docs/cluster.md lists the same numbers; a unit test checks that the two
agree, and an integration test scans what the hosts really listen on.
"""

from __future__ import annotations

AGENT_PORT = 7077  # swarm agent (gRPC, HMAC-signed calls)

RAY_GCS_PORT = 6379  # head only: Ray's GCS; `ray.init(address="HEAD:6379")` connects here
RAY_DASHBOARD_PORT = 8265  # head only: dashboard and job/state HTTP API (token protected)
RAY_CLIENT_PORT = 10001  # head only: Ray Client server (ray://HEAD:10001)
RAY_NODE_MANAGER_PORT = 6380  # every node: raylet
RAY_OBJECT_MANAGER_PORT = 6381  # every node: object transfer between nodes
RAY_RUNTIME_ENV_AGENT_PORT = 6382  # every node
RAY_DASHBOARD_AGENT_GRPC_PORT = 6383  # every node: per-node dashboard agent (gRPC)
RAY_METRICS_EXPORT_PORT = 6384  # every node: Prometheus metrics (only with `ray.metrics: true`)
RAY_AUTOSCALER_METRICS_PORT = 6385  # head: autoscaler's Prometheus metrics (only with `ray.metrics: true`)
RAY_DASHBOARD_METRICS_PORT = 6386  # head: dashboard's Prometheus metrics (only with `ray.metrics: true`)
# Ray's per-node dashboard agent also serves HTTP (its job agent) on 52365 by default; swarm
# keeps that server closed (swarm.cluster.builders.ray_start_argv), so it has no port here.
RAY_MIN_WORKER_PORT = 10002  # every node: one port per Ray worker process, in this range
RAY_MAX_WORKER_PORT = 10999

# Custom Ray resource that marks where training workers may run: a node offers one per
# GPU, or one on a CPU-only PC, and none when the cluster file says `train: false`.
WORKER_SLOT_RESOURCE = "swarm_worker"

# Ray refuses object stores under 75 MiB; swarm never asks for less than this.
MIN_OBJECT_STORE_BYTES = 100 * 1024**2

# Ports a worker PC must accept from the other PCs, and the head additionally.
WORKER_PORTS = (
    AGENT_PORT,
    RAY_NODE_MANAGER_PORT,
    RAY_OBJECT_MANAGER_PORT,
    RAY_RUNTIME_ENV_AGENT_PORT,
    RAY_DASHBOARD_AGENT_GRPC_PORT,
)
HEAD_PORTS = (RAY_GCS_PORT, RAY_DASHBOARD_PORT, RAY_CLIENT_PORT) + WORKER_PORTS
# Unauthenticated Prometheus endpoints, open only when the cluster file asks for metrics.
METRICS_PORTS = (RAY_METRICS_EXPORT_PORT, RAY_AUTOSCALER_METRICS_PORT, RAY_DASHBOARD_METRICS_PORT)
