"""``swarm merge``: combine LoRA adapters trained on one base into one adapter folder."""

from __future__ import annotations

from swarm.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="combine the adapters of several runs on one base (exactly, or TIES, DARE-TIES, SVD, ...) into one",
        description="Combine the LoRA adapters of SOURCE folders (runs written by `swarm train`, or earlier "
        "merges) with peft's add_weighted_adapter, and write one adapter folder with a model card naming its "
        "sources and method. The base's weights are not needed. `swarm export OUT --merge --gguf` then folds "
        "it into the base or makes GGUF files of it.",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="run folders or `swarm merge` folders (two or more)")
    p.add_argument(
        "--method", default="cat", choices=["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"],
        help="cat (default): exactly the weighted sum of the adapters' updates, at the sum of their ranks; "
        "linear: weighted sums of the A and of the B matrices, equal ranks, approximate (adds each adapter's A "
        "times another's B); svd: weighted sum of the updates cut to --rank; ties, dare_linear, dare_ties: "
        "pruned with --density, equal ranks",
    )
    p.add_argument(
        "--weights", metavar="W,W,...",
        help="one weight per source, e.g. 0.7,0.3 (default 1 each: the sum of their updates)",
    )
    p.add_argument("--density", type=float, help="fraction of each adapter's weights kept (ties and dare methods)")
    p.add_argument("--rank", type=int, help="rank of the result for svd (default the largest source rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dare methods' random pruning (default 0)")
    p.add_argument(
        "--out", metavar="DIR",
        help="folder to write (default ./{base}-{method}-merge-r{rank}-{yyyymmdd}); its name follows the naming rules",
    )
    p.add_argument("--base", metavar="DIR", help="local folder with the base's config.json, when it is not found")
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.export.adapters_merge import merge_adapters

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {args.weights!r} is not a list of numbers like 0.7,0.3") from None
    out = merge_adapters(
        args.sources, args.out, method=args.method, weights=weights, density=args.density, svd_rank=args.rank,
        seed=args.seed, base=args.base,
    )
    print(f"adapter: {out}")
    return 0
