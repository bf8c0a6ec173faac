"""Reading a job file, applying ``--set`` overrides, and turning errors into one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from swarm.config.models import JobConfig
from swarm.errors import UserError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping, in place.

    The value is parsed as YAML, so ``data.files=[a.jsonl,b.jsonl]`` gives a list and
    ``train.lr=1e-4`` a float.

    Raises:
        UserError: an override without ``=`` or with an empty key.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: value {text!r} is not valid YAML ({_first_line(exc)})") from None
        value = _yaml_1_2_number(value)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _yaml_1_2_number(value: Any) -> Any:
    """PyYAML follows YAML 1.1, where ``1e-4`` is a string; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            return value
    return value


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Load, override and validate a job file.

    Raises:
        UserError: a missing or malformed file, an unknown key, or an invalid value.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"job file {path} is a folder; give the job's YAML file, e.g. configs/demo.yaml")
    if not path.is_file():
        raise UserError(f"job file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {_first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections (model:, data:, train: ...)")
    apply_overrides(raw, overrides or [])
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{path}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line for the first problem pydantic found, naming the key."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'{more}"
    if err["type"] == "missing":
        return f"missing required key '{key}'{more}"
    message = err["msg"].removeprefix("Value error, ")
    if not key:
        return message + more
    return f"{key}: {message} (got {err.get('input')!r}){more}"


def _first_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
