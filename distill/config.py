"""Typed configs loaded from YAML.

Every stage has a pydantic config with every option named, typed and documented (`Field(description=...)`).
Unknown keys are errors, so a typo in a YAML file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="StrictModel")


class ConfigError(ValueError):
    """A config or task file is invalid; the message names the file and every bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  - {loc}: {e['msg']}")
    return "\n".join(lines)


def build_config(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
    """Build `cls` from an optional YAML file, then apply non-None keyword overrides (e.g. from the CLI)."""
    data = read_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return build_config(cls, data, str(path) if path else cls.__name__)


def check_settings(path: str, settings: dict[str, Any], what: str) -> None:
    """A stage's output holds the settings it was made with (`path`, JSON, local or URI). A rerun into it (to
    resume, or finding it complete) must have the same ones: anything else would mix two runs or return a stale
    result, so it is a ConfigError naming every changed field. First run: the settings are written."""
    from distill.storage import read_json, write_json

    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))  # compare as stored
    previous = read_json(path)
    if previous is None:
        write_json(path, settings)
        return
    if previous != settings:
        changed = sorted(k for k in set(settings) | set(previous) if previous.get(k) != settings.get(k))
        raise ConfigError(f"{path.rsplit('/', 1)[0]} already holds {what} made with different settings "
                          f"({', '.join(changed)}); use a new output directory or delete this one")
