"""The driver's recorder and progress display, fed the messages a worker sends in the
order ``swarm.train.worker.loop`` sends them (a step, then that step's eval)."""

from __future__ import annotations

from swarm.config.models import JobConfig
from swarm.metrics_log import FILE, read_metrics
from swarm.train.driver.recorder import RunRecorder

MAX_STEPS = 4


def recorder(tmp_path) -> RunRecorder:
    job = JobConfig.model_validate({"model": {"path": "m"}, "data": {"files": ["d.txt"]},
                                    "train": {"max_steps": MAX_STEPS, "eval_every": 2}})
    rec = RunRecorder(tmp_path, job, dashboard_url=None)
    rec.handle({"kind": "start", "deepspeed": {}, "world_size": 1, "precision": "fp32", "trainable_params": 10,
                "start_step": 0, "hosts": [{"hostname": "pc", "gpus": [], "ram_bytes": 1, "cpu_threads": 2}]})
    return rec


def train(rec: RunRecorder) -> None:
    for step in range(1, MAX_STEPS + 1):
        rec.handle({"kind": "step", "step": step, "loss": 2.0 / step, "tokens": 100, "tokens_per_s": 50.0,
                    "peak_rss_bytes": 2**30})
        if step % 2 == 0:
            rec.handle({"kind": "eval", "step": step, "eval_loss": 8.0 - step})
    rec.note("checkpoint: somewhere")


def test_the_last_progress_line_shows_the_final_eval(tmp_path, capsys):
    """The worker logs the last step's eval after the step: the line for that step must show it,
    not the eval before it (the demo's last line once said "eval 8.51" while run.json had another)."""
    rec = recorder(tmp_path)
    train(rec)
    rec.close()
    final_eval = rec.summary()["eval_loss"]
    assert final_eval == [r["eval_loss"] for r in read_metrics(tmp_path / FILE) if "eval_loss" in r][-1]
    lines = capsys.readouterr().err.splitlines()
    last = [line for line in lines if line.startswith(f"step {MAX_STEPS}/{MAX_STEPS}")]
    assert len(last) == 1 and f"eval {final_eval:.4f}" in last[0], lines
    # Still above what follows it.
    assert lines.index(last[0]) < lines.index("checkpoint: somewhere"), lines


def test_the_progress_bar_shows_the_final_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws its bar as on a terminal
    monkeypatch.setenv("COLUMNS", "200")
    rec = recorder(tmp_path)
    train(rec)
    rec.close()  # the bar's last frame stays on the screen
    final_eval = rec.summary()["eval_loss"]
    last_frame = capsys.readouterr().err.rsplit("step", 1)[-1]
    assert f"{MAX_STEPS}/{MAX_STEPS}" in last_frame and f"eval {final_eval:.4f}" in last_frame, last_frame
