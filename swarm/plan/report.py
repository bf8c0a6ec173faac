"""A plan as the terminal shows it: strategies compared, then each node's biggest terms."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from swarm.plan.candidates import Candidate, NodeFigures
from swarm.plan.decide import Plan
from swarm.plan.memory import peak_terms
from swarm.plan.speed import CPU_STEP_CAVEAT

GiB = 1024**3


def render(plan: Plan, console: Console | None = None) -> None:
    """Print ``plan``: a header, one row per strategy, a table per node and the decision."""
    console = console or Console()
    if not console.is_terminal and console.width < 120:
        console.width = 120  # a pipe or a log: rich would fold the tables at 80 columns
    m, w = plan.model, plan.workload
    quant = f"{m.quantizable_params / 1e9:.2f} B in 4-bit" if w.bits == 4 else "16-bit base"
    targets = w.lora_targets if isinstance(w.lora_targets, str) else ",".join(w.lora_targets)
    console.print(
        f"[bold]{m.name}[/]: {m.total_params / 1e9:.2f} B params ({quant}), LoRA r={w.lora_r} on {targets} "
        f"({m.lora_params(w.lora_targets, w.lora_r) / 1e6:.1f} M); seq_len {plan.seq_len}, "
        f"{plan.placement.describe()}, {plan.precision}"
    )
    # Step times on CPU workers are rough (speed.CPU_STEP_CAVEAT); each place that shows one says so.
    caveat = "" if plan.placement.use_gpu else CPU_STEP_CAVEAT
    console.print(_strategies_table(plan, caveat))
    for node in plan.nodes:
        console.print(_node_heading(node))
        console.print(_node_table(node))
    if plan.fits:
        step = plan.step_seconds
        sent = max(n.step.bytes_sent for n in plan.nodes)
        console.print(
            f"[bold green]plan:[/] {plan.strategy.name} ({plan.strategy.label}), micro_batch {plan.micro_batch}, "
            f"grad_accum {plan.grad_accum}; about {_duration(step)} per step, {plan.tokens_per_s:,.0f} tokens/s"
            f"{f' ({caveat})' if caveat else ''}, {_size(sent)} sent per worker per step"
        )
        console.print(f"why: {plan.strategy_reason}")
    else:
        console.print(f"[bold red]does not fit:[/] {plan.reason}")
    for note in plan.notes:
        console.print(f"note: {note}")


def _strategies_table(plan: Plan, caveat: str) -> Table:
    title = "strategies (each at the largest micro-batch that fits)" + (f"; step times {caveat}" if caveat else "")
    table = Table(title=title, title_justify="left")
    for col, justify in (("strategy", "left"), ("fits", "left"), ("mb x accum", "right"), ("GPU peak", "right"),
                         ("RAM peak", "right"), ("step", "right"), ("what breaks", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for c in plan.candidates:
        chosen = c.strategy == plan.strategy
        table.add_row(
            ("* " if chosen and plan.fits else "") + c.strategy.name,
            "yes" if c.fits else "no",
            f"{c.micro_batch} x {c.grad_accum}",
            _worst(c, "gpu"),
            _worst(c, "ram"),
            _duration(c.step_seconds),
            c.problem or "",
        )
    return table


def _worst(c: Candidate, where: str) -> str:
    if where == "gpu":
        gpus = [n for n in c.nodes if n.gpu_capacity]
        if not gpus:
            return "-"
        n = max(gpus, key=lambda n: n.gpu_bytes / n.gpu_capacity)
        return f"{n.gpu_bytes / GiB:.1f}/{n.gpu_capacity / GiB:.0f} GiB"
    n = max(c.nodes, key=lambda n: n.ram_bytes / n.ram_limit)
    return f"{n.ram_bytes / GiB:.1f}/{n.ram_limit / GiB:.0f} GiB"


def _node_heading(node: NodeFigures) -> str:
    status = "[green]fits[/]" if node.fits else f"[red]does not fit[/]: {node.problem}"
    gpu = (f"GPU {node.gpu_bytes / GiB:.1f} of {node.gpu_capacity / GiB:.1f} GiB per card "
           f"(headroom {(node.gpu_capacity - node.gpu_bytes) / GiB:.1f}), ") if node.gpu_capacity else ""
    line = (f"\n[bold]{node.name}[/] ({node.device}, {node.workers} worker{'s' if node.workers != 1 else ''}): "
            f"{status}\n{gpu}RAM {node.ram_bytes / GiB:.1f} of {node.ram_limit / GiB:.1f} GiB usable "
            f"(headroom {(node.ram_limit - node.ram_bytes) / GiB:.1f})")
    if node.nvme_bytes:
        line += f", NVMe {node.nvme_bytes / 1e9:.0f} GB"
    return line


def _node_table(node: NodeFigures) -> Table:
    table = Table()
    table.add_column("largest terms at peak", overflow="fold")
    for col in ("GPU/card", "RAM", "NVMe"):
        table.add_column(col, justify="right")
    rows = []
    terms = {"gpu": peak_terms(list(node.terms), "gpu"), "ram": peak_terms(node.node_terms(), "ram"),
             "nvme": peak_terms(node.node_terms(), "nvme")}
    for where, col in (("gpu", 1), ("ram", 2), ("nvme", 3)):
        for t in terms[where]:
            cells = ["", "", ""]
            cells[col - 1] = f"{t.bytes / GiB:.2f}"
            rows.append((t.bytes, t.name + (" (loading)" if t.phase == "load" else ""), cells))
    for _, name, cells in sorted(rows, key=lambda r: -r[0])[:8]:
        table.add_row(name, *cells)
    return table


def _size(nbytes: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
