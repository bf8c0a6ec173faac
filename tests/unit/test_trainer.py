"""swarm's lean Ray Train trainer: which helpers it leaves out, and that its backend never
imports torch (Ray Train's controller loads it; importing torch there costs ~150 MiB)."""

import socket
import subprocess
import sys

from ray.train import RunConfig, ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

from swarm.train.driver.ray_session import free_dashboard_port
from swarm.train.driver.trainer import LocalFixedScalingPolicy, ProcessGroupConfig, lean_trainer


def test_trainer_module_loads_without_torch():
    code = "import sys, swarm.train.driver.trainer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _callback_names(tmp_path, ray_started_here: bool) -> set[str]:
    trainer = lean_trainer(
        lambda config: None, train_loop_config={}, backend_config=ProcessGroupConfig("gloo", 60),
        scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(name="t", storage_path=str(tmp_path)),
        ray_started_here=ray_started_here,
    )
    return {type(c).__name__ for c in trainer._create_default_callbacks()}


def test_a_run_on_its_own_ray_starts_no_dataset_manager_and_no_cleaner(tmp_path):
    names = _callback_names(tmp_path, ray_started_here=True)
    assert "BackendSetupCallback" in names
    assert "DatasetsCallback" not in names
    assert "PlacementGroupCleanerCallback" not in names


def test_a_run_on_a_swarm_keeps_the_placement_group_cleaner(tmp_path):
    names = _callback_names(tmp_path, ray_started_here=False)
    assert "PlacementGroupCleanerCallback" in names
    assert "DatasetsCallback" not in names


def test_local_fixed_policy_decides_without_an_autoscaling_coordinator():
    policy = LocalFixedScalingPolicy(scaling_config=ScalingConfig(num_workers=2))
    policy.after_controller_start(train_run_context=None)
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision)
    assert decision.num_workers == 2


def test_every_worker_of_a_pc_sees_all_its_gpus_and_takes_its_own():
    # Ray Train would otherwise give each worker one GPU, numbered 0 in every worker; swarm's
    # device choice (swarm.train.worker.device.worker_device) takes the one at the local rank.
    assert ProcessGroupConfig("nccl", 300).backend_cls.share_cuda_visible_devices


def test_dashboard_moves_off_a_taken_port(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        chosen = free_dashboard_port(port)
        assert chosen != port
    assert f"port {port} is taken" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", chosen))  # the port it chose is free


def test_dashboard_keeps_a_free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert free_dashboard_port(port) == port
