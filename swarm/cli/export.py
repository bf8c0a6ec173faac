"""``swarm export RUN``: write a run's adapter (and a merged model) with a model card."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run's adapter, or a merged model, with a model card and a standard name",
        description="Write the LoRA adapter of RUN (peft format) to OUT/NAME and, with --merge, the base "
        "model with the adapter folded in to OUT/NAME-merged (safetensors shards, loadable by "
        "AutoModelForCausalLM.from_pretrained). Each folder gets a README.md model card. Merging "
        "needs the base weights on this machine and runs tensor by tensor, in modest RAM.",
    )
    p.add_argument("run_dir", metavar="RUN", help="run folder written by `swarm train`")
    p.add_argument(
        "--checkpoint", metavar="STEP|PATH",
        help="export this checkpoint (a step number or a checkpoint folder) instead of the final adapter",
    )
    p.add_argument("--merge", action="store_true", help="also write the merged model to OUT/NAME-merged")
    p.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights (default bf16)",
    )
    p.add_argument("--out", metavar="DIR", help="folder to write the exports into (default RUN/export)")
    p.add_argument("--name", help="export name (default the run's name); lowercase letters, digits, '.', '-'")
    p.add_argument(
        "--max-shard-size", default="2GB", metavar="SIZE",
        help="largest safetensors shard of the merged model, e.g. 2GB, 500MB (default 2GB)",
    )
    p.add_argument(
        "--base", metavar="DIR",
        help="local folder of the base model for --merge (default the run's model.path, or the hub cache)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.export import export_run

    path = export_run(
        args.run_dir, out_dir=args.out, checkpoint=args.checkpoint, merge=args.merge, dtype=args.dtype,
        name=args.name, base=args.base, max_shard_size=args.max_shard_size,
    )
    if args.merge:
        print(f"adapter: {path.with_name(path.name.removesuffix('-merged'))}")
        print(f"merged: {path}")
    else:
        print(f"adapter: {path}")
    return 0
