"""``--resume``'s refusals of a job whose adapter no longer means what the checkpoint's did."""

from __future__ import annotations

import pytest

from swarm.config.models import JobConfig
from swarm.errors import UserError
from swarm.train.driver.resume import check_compatible, fingerprint

SHA = "0" * 64


def job(**lora) -> JobConfig:
    return JobConfig.model_validate({"model": {"path": "m"}, "data": {"files": ["d.txt"]}, "lora": lora})


def refusal(saved: dict, current: dict, source) -> str:
    with pytest.raises(UserError) as err:
        check_compatible(saved, current, source)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"cannot resume from {source}: "), line
    return line


@pytest.mark.parametrize(("key", "before", "after", "why"), [
    ("use_rslora", False, True, "the adapter's scale would change"),
    ("use_rslora", True, False, "the adapter's scale would change"),
    ("use_dora", True, False, "DoRA magnitude weights would be dropped"),
    ("use_dora", False, True, "has no DoRA magnitude weights"),
])
def test_a_changed_lora_variant_is_refused(tmp_path, key, before, after, why):
    line = refusal(fingerprint(job(**{key: before}), SHA), fingerprint(job(**{key: after}), SHA), tmp_path)
    assert f"lora.{key} changed from {before!r} to {after!r}" in line and why in line, line
    check_compatible(fingerprint(job(**{key: before}), SHA), fingerprint(job(**{key: before}), SHA), tmp_path)


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_a_checkpoint_from_before_the_check_is_judged_by_its_adapter_config(tmp_path, variant):
    """Checkpoints written before the fingerprint held these keys: their adapter's peft config says."""
    from peft import LoraConfig

    LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", **{variant: True}).save_pretrained(tmp_path / "adapter")
    saved = fingerprint(job(**{variant: True}), SHA)
    del saved["lora.use_dora"], saved["lora.use_rslora"]  # what such a manifest held
    assert f"lora.{variant} changed from True to False" in refusal(saved, fingerprint(job(), SHA), tmp_path)
    check_compatible(saved, fingerprint(job(**{variant: True}), SHA), tmp_path)
