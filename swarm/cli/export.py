"""``swarm export RUN``: write a run's adapter (a merged model, GGUF files) with a model card."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run's adapter, a merged model or GGUF files, with a model card and a standard name",
        description="Write the LoRA adapter of RUN (peft format) to OUT/NAME; with --merge, the base "
        "model with the adapter folded in to OUT/NAME-merged (safetensors shards, loadable by "
        "AutoModelForCausalLM.from_pretrained); with --gguf or --gguf-adapter, GGUF files for llama.cpp, "
        "Ollama and LM Studio and an Ollama Modelfile to OUT/NAME-gguf. Each folder gets a README.md model "
        "card. Merging needs the base weights on this machine and runs tensor by tensor, in modest RAM. "
        "GGUF files are made by llama.cpp's own converter and quantizer, which come with the gguf extra, "
        # swarm.export.llama_build.install_command(), written out: importing swarm.export loads torch.
        """built for every CPU (pip's own build targets the CPU it runs on): CMAKE_ARGS="-DGGML_NATIVE=OFF" """
        "pip install --no-cache-dir 'swarm-train[gguf]'.",
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
    p.add_argument(
        "--gguf", nargs="?", const="", metavar="TYPE[,TYPE...]",
        help="write OUT/NAME-gguf/NAME-TYPE.gguf from the merged model, and an Ollama Modelfile; types: f16, "
        "bf16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_k_s, q3_k_l, q3_k_m, q3_k_s, q2_k, q5_0, q4_0 (default q4_k_m)",
    )
    p.add_argument(
        "--gguf-adapter", nargs="?", const="", metavar="TYPE",
        help="write the adapter as a GGUF LoRA, OUT/NAME-gguf/NAME-lora-TYPE.gguf, for a base GGUF you "
        "already have; types: f32, f16, bf16, q8_0 (default f16)",
    )
    p.add_argument(
        "--llama-cpp", metavar="DIR",
        help="a llama.cpp checkout whose converters to use (default $LLAMA_CPP_DIR, else those of the "
        "installed llama-cpp-python release, fetched once)",
    )
    p.add_argument("--out", metavar="DIR", help="folder to write the exports into (default RUN/export)")
    p.add_argument("--name", help="export name (default the run's name); lowercase letters, digits, '.', '-'")
    p.add_argument(
        "--max-shard-size", default="2GB", metavar="SIZE",
        help="largest safetensors shard of the merged model, e.g. 2GB, 500MB (default 2GB)",
    )
    p.add_argument(
        "--base", metavar="DIR",
        help="local folder of the base model for --merge and --gguf (default the run's model.path, or the hub cache)",
    )
    p.set_defaults(run=run)


def run(args) -> int:
    from swarm.export import export_run
    from swarm.export.gguf import parse_adapter_type, parse_types
    from swarm.export.gguf_card import human_size

    result = export_run(
        args.run_dir, out_dir=args.out, checkpoint=args.checkpoint, merge=args.merge, dtype=args.dtype,
        name=args.name, base=args.base, max_shard_size=args.max_shard_size,
        gguf=parse_types(args.gguf) if args.gguf is not None else None,
        gguf_adapter=parse_adapter_type(args.gguf_adapter) if args.gguf_adapter is not None else None,
        llama_cpp_dir=args.llama_cpp,
    )
    print(f"adapter: {result.adapter}")
    if result.merged:
        print(f"merged: {result.merged}")
    for file in result.gguf_files:
        print(f"gguf: {file.path} ({file.gguf_type}, {human_size(file.size_bytes)})")
    return 0
