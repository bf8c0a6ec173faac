"""Job configuration: pydantic models, YAML loading and ``--set`` overrides."""

from swarm.config.loading import apply_overrides, load_job
from swarm.config.models import JobConfig

__all__ = ["JobConfig", "apply_overrides", "load_job"]
