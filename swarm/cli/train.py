"""``swarm train JOB``: fine-tune a model as the job file says."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="fine-tune a model (QLoRA + DeepSpeed ZeRO-3 through Ray Train)",
        description="Fine-tune the model in JOB with QLoRA and DeepSpeed ZeRO-3. Starts a local Ray "
        "when none is running. The last line printed is `run: PATH`, the run folder.",
    )
    p.add_argument("job", help="job file (YAML), e.g. configs/demo.yaml")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a job value, e.g. --set train.max_steps=50 (the value is read as YAML)",
    )
    p.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="PATH",
        help="continue this job's newest run from its newest intact checkpoint, "
        "or from the given run or checkpoint folder",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.config import load_job
    from swarm.train.driver.launch import train

    job = load_job(args.job, args.overrides)
    run_dir = train(job, resume=args.resume)
    print(f"run: {run_dir}")
    return 0
