"""Which outer optimizer diloco should use: a study on a real model over several seeds.

    python tests/bench/study_diloco_outer.py run --pcs 2 --every 8,16 --seeds 0,1,2 --out study.jsonl
    python tests/bench/study_diloco_outer.py table study.jsonl

SmolLM2-135M-Instruct (the suite's real model, tests/lab/realmodel.py) with LoRA r16 on every
linear layer, fine-tuned on chat data made from CPython's language reference: each topic's
text in chunks of about 200 characters, each chunk the answer to a question naming the topic
and the part. Topics are split into training and held-out ones; the held-out loss is the
mean loss per answer token over a fixed set of held-out chunks.

The model computes in bf16 (CPU autocast; LoRA weights and AdamW in fp32). K PCs run
simulated in one process (one base model; each PC its own adapter copy and its own
AdamW with swarm's schedule), each step every PC trains on 2 sequences of at most 128 tokens.
The arms see the same sequences in the same order: at step s PC k trains on the records
(s K + k) 2 and +1 of the seed's shuffle; ``replicate`` trains one adapter on all K PCs'
sequences of the step at once (the mean of the PCs' losses: what averaging gradients every
step computes). Every H steps the diloco arms exchange with swarm's own outer step
(``swarm.train.worker.diloco.outer.outer_step``; pseudo-gradients rounded to bf16 as on the wire):

- ``average``, ``nesterov``, ``nesterov-b``: the rules of swarm.train.worker.diloco.outer;
- ``frozen-a/average``, ``frozen-a/nesterov``: LoRA's A factors frozen at their shared
  initialisation, only B trained and exchanged.

The seed sets the data order and the adapter's initialisation. Each run appends one JSON line
(held-out loss at the checkpoints, the norm of the adapter's update B A scaled as peft applies
it, the bytes each PC sent: a ring all-reduce of bf16 values). ``table`` prints mean and spread
(min..max) over seeds per arm. It prints figures; it passes or fails nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SEQ_LEN = 128
PER_PC = 2  # sequences per PC per step
CHUNK_CHARS = 200
LR, WARMUP, MIN_LR_RATIO = 5e-4, 4, 0.1
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
EVAL_RECORDS = 48


def chunks(text: str, size: int) -> list[str]:
    """Whole paragraphs (or lines) of ``text`` gathered into pieces of about ``size`` characters."""
    pieces, current = [], ""
    for para in [p.strip() for p in text.split("\n\n") if p.strip()]:
        if current and len(current) + len(para) > size:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
        while len(current) > size * 2:  # a very long paragraph: cut at a space
            cut = current.rfind(" ", 0, size) if current.rfind(" ", 0, size) > 0 else size
            pieces.append(current[:cut])
            current = current[cut:].lstrip()
    if current:
        pieces.append(current)
    return pieces


def records() -> tuple[list[dict], list[dict]]:
    """(train, held-out) chat records from the reference topics, split by topic."""
    from pydoc_data.topics import topics

    from lab.realmodel import split_topics

    def rows(names):
        out = []
        for name in names:
            parts = chunks(topics[name], CHUNK_CHARS)
            for i, part in enumerate(parts):
                question = f'What does the Python language reference say about "{name}"? Part {i + 1} of {len(parts)}.'
                out.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": part}]})
        return out

    train, held = split_topics(sorted(topics))
    return rows(train), rows(held)


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record, cut to SEQ_LEN; labels only on the answer."""
    from lab.realmodel import answer_ids

    prompt, answer = answer_ids(tokenizer, record)
    ids = (prompt + answer)[:SEQ_LEN]
    labels = ([-100] * len(prompt) + answer)[:SEQ_LEN]
    return ids, labels


def batch(encoded: list[tuple[list[int], list[int]]], pad: int):
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (i, lab) in enumerate(encoded):
        ids[row, :len(i)], labels[row, :len(lab)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
    return ids, labels, mask


def row_losses(model, ids, labels, mask):
    """(sum of answer-token losses, answer tokens) per row."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16):  # 1.5x faster here than fp32 (AVX512-BF16)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="none").view(target.shape)
    return loss.sum(1), (target != -100).sum(1)


class Study:
    """One model, the data, and the helpers every arm uses."""

    def __init__(self, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lab.realmodel import smollm2

        torch.set_num_threads(threads)
        folder = smollm2()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.base.requires_grad_(False)
        train, held = records()
        self.train = [encode(self.tokenizer, r) for r in train]
        self.held = [encode(self.tokenizer, r) for r in random.Random(1).sample(held, EVAL_RECORDS)]
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def adapter(self, seed: int, freeze_a: bool):
        """A fresh LoRA adapter on the base (peft's init from ``seed``); (model, named trainables)."""
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(self.base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if freeze_a:
            for name, p in model.named_parameters():
                if ".lora_A." in name:
                    p.requires_grad_(False)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return model, named

    def evaluate(self, model) -> float:
        import torch

        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for i in range(0, len(self.held), 16):
                s, n = row_losses(model, *batch(self.held[i:i + 16], self.pad))
                total, count = total + float(s.sum()), count + int(n.sum())
        model.train()
        return total / count


def schedule(total: int):
    def factor(step: int) -> float:  # swarm.train.worker.loop.lr_lambda's shape
        if step < WARMUP:
            return (step + 1) / (WARMUP + 1)
        progress = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def flat(named):
    import torch

    return torch.cat([p.detach().flatten().clone() for _, p in named])


def set_flat(named, values) -> None:
    offset = 0
    for _, p in named:
        p.data.copy_(values[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def update_norm(model) -> float:
    """sqrt of the sum over LoRA layers of ||scale B A||_F^2: how far the adapter moved the base."""
    total = 0.0
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            total += float(((b.detach() @ a.detach()) * module.scaling["default"]).pow(2).sum())
    return math.sqrt(total)


def ring_bytes(values: int, pcs: int) -> int:
    return int(2 * (pcs - 1) / pcs * values * 2) if pcs > 1 else 0  # bf16


def run_arm(study: Study, arm: str, pcs: int, every: int, seed: int, steps: int, evals: list[int],
            per_pc: int = PER_PC) -> dict:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

    from swarm.train.worker.diloco.outer import outer_step

    freeze_a = arm.startswith("frozen-a/")
    rule = arm.split("/")[-1]
    model, named = study.adapter(seed, freeze_a)
    order = list(range(len(study.train)))
    random.Random(seed).shuffle(order)

    def step_records(step: int, pc: int):
        start = (step * pcs + pc) * per_pc
        return [study.train[order[(start + i) % len(order)]] for i in range(per_pc)]

    def new_optimizer():
        opt = torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0)
        return opt, LambdaLR(opt, schedule(steps))

    figures = {"arm": arm, "pcs": pcs, "every": every if arm != "replicate" else None, "seed": seed,
               "steps": steps, "per_pc": per_pc, "eval": {}, "trainable": sum(p.numel() for _, p in named)}
    started = time.perf_counter()
    figures["eval"][0] = study.evaluate(model)
    if arm == "replicate":
        opt, sched = new_optimizer()
        for step in range(steps):
            sums, counts = row_losses(model, *batch([r for pc in range(pcs) for r in step_records(step, pc)], study.pad))
            pc_losses = [sums[pc * per_pc:(pc + 1) * per_pc].sum() / counts[pc * per_pc:(pc + 1) * per_pc].sum()
                         for pc in range(pcs)]
            (sum(pc_losses) / pcs).backward()
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            if step + 1 in evals:
                figures["eval"][step + 1] = study.evaluate(model)
        figures["bytes_per_pc"] = steps * ring_bytes(figures["trainable"], pcs)
    else:
        inner = [new_optimizer() for _ in range(pcs)]
        global_flat = flat(named)
        momentum = torch.zeros_like(global_flat)
        a_slices, offset = [], 0
        for name, p in named:
            if ".lora_A." in name:
                a_slices.append(slice(offset, offset + p.numel()))
            offset += p.numel()
        exchanges = 0
        for first in range(0, steps, every):
            deltas, tokens = [], []
            for pc in range(pcs):
                set_flat(named, global_flat)
                opt, sched = inner[pc]
                seen = 0
                for step in range(first, min(first + every, steps)):
                    sums, counts = row_losses(model, *batch(step_records(step, pc), study.pad))
                    (sums.sum() / counts.sum()).backward()
                    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                    seen += int(counts.sum())
                deltas.append(global_flat - flat(named))
                tokens.append(seen)
            mean = sum(d * (t / sum(tokens)) for d, t in zip(deltas, tokens)).to(torch.bfloat16).float()
            global_flat, momentum = outer_step(global_flat, mean, momentum, rule, OUTER_LR, OUTER_MOMENTUM, a_slices)
            exchanges += 1
            set_flat(named, global_flat)
            done = min(first + every, steps)
            if done in evals:
                figures["eval"][done] = study.evaluate(model)
        figures["exchanges"] = exchanges
        figures["bytes_per_pc"] = exchanges * ring_bytes(figures["trainable"], pcs)
    figures["update_norm"] = update_norm(model)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    model.unload()  # the base without LoRA layers, for the next arm
    return figures


ARMS = ["replicate", "average", "nesterov", "nesterov-b", "frozen-a/average", "frozen-a/nesterov"]


def main_run(args) -> None:
    study = Study(args.threads)
    print(f"{len(study.train)} training records, {len(study.held)} held-out", flush=True)
    everies = [int(x) for x in args.every.split(",")]
    arms = args.arms.split(",")
    done = set()
    out = Path(args.out)
    if out.exists():  # resume a study that was cut off
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["arm"], r["pcs"], r["every"], r["seed"], r["steps"], r.get("per_pc", PER_PC)))
    evals = [int(x) for x in args.evals.split(",")] if args.evals else [args.steps]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in arms:
            for every in ([None] if arm == "replicate" else everies):
                key = (arm, args.pcs, every, seed, args.steps, args.per_pc)
                if key in done:
                    continue
                figures = run_arm(study, arm, args.pcs, every or 1, seed, args.steps, evals, args.per_pc)
                with out.open("a") as f:
                    f.write(json.dumps(figures) + "\n")
                print(json.dumps(figures), flush=True)


def main_table(args) -> None:
    rows = [json.loads(line) for path in args.files for line in Path(path).read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["pcs"], r.get("per_pc", PER_PC), r["arm"], r["every"], r["steps"]), []).append(r)
    print("| PCs x sequences | steps | arm | H | seeds | held-out loss (mean, min..max) | vs replicate "
          "| norm of B A | MB per PC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (pcs, per_pc, arm, every, steps), runs in sorted(groups.items(),
                                                          key=lambda kv: (kv[0][:2], kv[0][4], kv[0][3] or 0, kv[0][2])):
        final = [r["eval"][str(steps)] for r in runs]
        # replicate of the same PCs, else one that trains the same records each step (4 x 1 as 2 x 2)
        base = groups.get((pcs, per_pc, "replicate", None, steps)) or next(
            (g for (p, q, a, _, n), g in groups.items() if a == "replicate" and n == steps and p * q == pcs * per_pc),
            None)
        ref = statistics.mean(r["eval"][str(steps)] for r in base) if base else None
        vs = f"{100 * (statistics.mean(final) / ref - 1):+.2f}%" if ref else ""
        norm = statistics.mean(r["update_norm"] for r in runs)
        print(f"| {pcs} x {per_pc} | {steps} | {arm} | {every or '-'} | {len(runs)} | {statistics.mean(final):.4f} "
              f"({min(final):.4f}..{max(final):.4f}) | {vs} | {norm:.2f} | {runs[0]['bytes_per_pc'] / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--pcs", type=int, default=2)
    run.add_argument("--every", default="8,16")
    run.add_argument("--arms", default=",".join(ARMS))
    run.add_argument("--seeds", default="0,1,2")
    run.add_argument("--steps", type=int, default=128)
    run.add_argument("--evals", default="", help="steps to evaluate at (default: the last)")
    run.add_argument("--per-pc", type=int, default=PER_PC, help="sequences per PC per step")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--out", required=True)
    table = sub.add_parser("table")
    table.add_argument("files", nargs="+")
    args = parser.parse_args()
    main_run(args) if args.command == "run" else main_table(args)


if __name__ == "__main__":
    main()
