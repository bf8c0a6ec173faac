"""``swarm plan JOB``: will the job fit on each machine, with which strategy, how fast."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="size a job for each machine before downloading anything, and pick a strategy",
        description="Count the model's parameters from its config (no weights), size GPU, RAM and "
        "NVMe for each strategy on each machine, and pick the fastest that fits everywhere. Machines "
        "come from --hardware FILE, the running swarm (--cluster), or this machine. Exit status 0 "
        "when the job fits, 1 when nothing fits, 2 for bad input.",
    )
    p.add_argument("job", help="job file (YAML), e.g. configs/demo.yaml")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--hardware", metavar="FILE", help="machines described in YAML (see configs/hardware/)")
    source.add_argument("--cluster", action="store_true", help="the nodes of the running swarm")
    p.add_argument("--insecure", action="store_true", help="with --cluster: the swarm runs without a secret")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a job value, e.g. --set data.seq_len=4096 (the value is read as YAML)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.config import load_job
    from swarm.hardware import inventory
    from swarm.plan.decide import make_plan
    from swarm.plan.inventories import inventory_from_cluster, load_hardware

    job = load_job(args.job, args.overrides)
    link_gbps = None
    if args.hardware:
        hardware = load_hardware(args.hardware)
        nodes, link_gbps = hardware.nodes, hardware.link_gbps
    elif args.cluster:
        nodes = inventory_from_cluster(args.insecure)
    else:
        nodes = [inventory(offload=job.offload.nvme_path)]
    plan = make_plan(job, nodes, link_gbps=link_gbps)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        from swarm.plan.report import render

        render(plan)
    return 0 if plan.fits else 1
