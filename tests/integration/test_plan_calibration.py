"""Calibration (issue 5, part 5): the plan's peak RSS of a training worker against the peak
RSS that worker really reached, for several strategies, on tiny models trained here.

``swarm train`` checks the job against a plan before loading anything and writes that plan
to RUN/plan.json; every logged step carries ``peak_rss_bytes``, the worker process's
``ru_maxrss``. The two must agree within the planner's target (15%).

The model is sized so that model-dependent memory is much of the worker's RSS; otherwise the
fixed cost of a worker (python, torch, DeepSpeed, Ray: about 670 MiB) would hide any error in
the terms that depend on the model. A tiny Llama 1536 wide and 6 layers deep has 129M
parameters, 492 MiB in fp32, while a step at seq_len 64 and micro-batch 1 costs a few seconds
on two cores. Its base is kept in fp32 (``quantization.bits: none``) for the strategy runs:
on a CPU worker the strategies differ only in what ZeRO-3 partitions and offloads, and a
4-bit base would make those parts 8 times smaller than the fp32 checkpoint every strategy
maps while loading. One more run trains the 4-bit base (swarm's QLoRA path) under the demo's
strategy, once more with torch's AVX2 kernels (a CPU without AVX512 allocates in another
order). Model-dependent memory is then 46-58% of the measured peak (the test asserts more
than 40%).

The overheads in ``swarm.plan.memory.Overheads`` were fitted to Llama runs like these. One
more case checks the model against a run it was not fitted to: a Qwen2 (biased attention
projections, another width and depth) with the 4-bit base.

Run with ``pytest -s`` to see the table of predicted and measured figures.
"""

from __future__ import annotations

import json

import pytest
from trainkit import DEMO_TEXT, run_dir_of, swarm, write_job

from swarm.plan import Strategy
from swarm.plan import memory as mem

pytestmark = pytest.mark.integration

TARGET = 0.15
MiB = 1024**2
HIDDEN, LAYERS = 1536, 6

# (quantization bits, offload.params, offload.optimizer)
CASES = [
    (None, "none", "none"),
    (None, "none", "cpu"),
    (None, "cpu", "cpu"),
    (4, "cpu", "cpu"),
]

ROWS: list[tuple[str, int, int]] = []


@pytest.fixture(scope="module")
def calibration_model(tmp_path_factory):
    """The 129M-parameter tiny Llama, made once for every run of this module."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("calibrates CPU workers' RSS; a CUDA worker is compared on torch's peak allocated memory")
    from swarm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("calibration") / "llama-1536x6", [DEMO_TEXT],
                           arch="llama", hidden=HIDDEN, layers=LAYERS)


@pytest.fixture(scope="module")
def holdout_model(tmp_path_factory):
    """A model the overheads were not fitted to: Qwen2, 1280 wide, 12 layers."""
    from swarm.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("holdout") / "qwen2-1280x12", [DEMO_TEXT],
                           arch="qwen2", hidden=1280, layers=12)


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    if ROWS:
        lines = [f"{'run':<36} {'predicted MiB':>14} {'measured MiB':>13} {'error':>7}"]
        for name, predicted, measured in ROWS:
            lines.append(f"{name:<36} {predicted / MiB:>14.0f} {measured / MiB:>13.0f} "
                         f"{(predicted - measured) / measured:>+7.1%}")
        print("\nplanned vs measured peak RSS of the training worker\n" + "\n".join(lines))


@pytest.mark.parametrize("bits, params, optimizer", CASES,
                         ids=[f"{'4bit' if b else 'fp32'}-params-{p}-opt-{o}" for b, p, o in CASES])
def test_planned_peak_rss_matches_the_measured_one(calibration_model, tmp_path, bits, params, optimizer):
    check_plan_against_run(calibration_model, tmp_path, bits, params, optimizer, "")


def test_a_model_the_overheads_were_not_fitted_to(holdout_model, tmp_path):
    check_plan_against_run(holdout_model, tmp_path, 4, "cpu", "cpu", " (Qwen2, not fitted)")


def test_the_plan_holds_with_the_kernels_of_a_cpu_without_avx512(calibration_model, tmp_path):
    """torch picks its kernels by the CPU (here AVX2, as on most desktop CPUs), and with them
    the order in which a worker allocates; the worker's peak must not follow (CI's machine
    once measured 1894 MiB for the 1497 MiB plan of the 4-bit case, this one 1363-1668)."""
    check_plan_against_run(calibration_model, tmp_path, 4, "cpu", "cpu", " (AVX2 kernels)",
                           env={"ATEN_CPU_CAPABILITY": "avx2"})


def check_plan_against_run(model, tmp_path, bits, params, optimizer, label: str, env: dict | None = None) -> None:
    # The overheads were fitted to ZeRO-3 workers: the strategy is forced, since `auto` plans
    # one worker whose parameters stay put as replicate (ZeRO-2).
    strategy = Strategy(3, params, optimizer)
    job = write_job(
        tmp_path, model,
        quantization={"bits": bits},
        data={"seq_len": 64, "eval_fraction": 0},
        train={"max_steps": 3, "micro_batch": 1, "grad_accum": 1, "warmup_steps": 0,
               "eval_every": 100, "checkpoint_every": 100, "strategy": "shard"},
        offload={"params": params, "optimizer": optimizer},
    )
    run_dir = run_dir_of(swarm("train", str(job), cwd=tmp_path, env=env))

    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["world_size"] == 1 and summary["precision"] == "fp32"
    assert summary["strategy"]["offload_params"] == params and summary["strategy"]["offload_optimizer"] == optimizer
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["fits"] and plan["strategy"]["variant"] == strategy.name
    node = plan["nodes"][0]
    assert node["device"] == "CPU" and node["workers"] == 1
    predicted = node["worker_ram_bytes"]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_rss_bytes"] for r in rows if "peak_rss_bytes" in r]
    assert len(peaks) == 3
    measured = max(peaks)

    name = f"{'4-bit' if bits else 'fp32'} base, {strategy.name}{label}"
    ROWS.append((name, predicted, measured))
    print(f"\n{name}: predicted {predicted / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB, "
          f"error {(predicted - measured) / measured:+.1%}")
    # The model, not the worker's fixed cost, must be much of what is being compared.
    assert measured - mem.OVERHEADS.cpu_worker_process > 0.4 * measured
    assert abs(predicted - measured) <= TARGET * measured, (
        f"{name}: plan {predicted / MiB:.0f} MiB, measured {measured / MiB:.0f} MiB; largest planned terms: "
        + ", ".join(f"{t['name']} {t['bytes'] / MiB:.0f}" for t in sorted(
            node["worker_terms"], key=lambda t: -t["bytes"])[:6])
    )
