"""Typed configs loaded from YAML.

Every stage has a pydantic config with every option named, typed and documented (`Field(description=...)`).
Unknown keys are errors, so a typo in a YAML file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, TypeVar

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


# ----------------------------------------------------------------------------------------------------------------
# Command-line options from a config class: one place per option (its Field), its description as the help.
def _option_type(annotation) -> Optional[tuple[str, Any]]:
    """(kind, detail) of a field that a single command-line option can carry: ('scalar', type), ('choice',
    values), ('bool', None) or ('list', item choices or None); None for nested configs and mappings."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _option_type(args[0]) if len(args) == 1 else None
    if origin is typing.Literal:
        return "choice", [str(v) for v in typing.get_args(annotation)]
    if origin is list:
        (item,) = typing.get_args(annotation) or (str,)
        inner = _option_type(item)
        if inner and inner[0] in ("scalar", "choice"):
            return "list", inner[1] if inner[0] == "choice" else None
        return None
    if annotation is bool:
        return "bool", None
    if annotation in (str, int, float):
        return "scalar", annotation
    return None


def add_config_arguments(parser, cls: type[BaseModel], exclude: tuple[str, ...] = ()) -> None:
    """Add --config, one --option per top-level field of `cls` that one value can set, and --set KEY=VALUE for
    the rest (nested fields: --set engine.batch_size=8; the value is read as YAML)."""
    parser.add_argument("--config", help=f"YAML file with {cls.__name__} fields (command-line options override it)")
    for name, field in cls.model_fields.items():
        kind = None if name in exclude else _option_type(field.annotation)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "").replace("%", "%%")
        if kind[0] == "bool":
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind[0] == "choice":
            parser.add_argument(flag, dest=name, choices=kind[1], default=None, help=help_text)
        elif kind[0] == "list":
            parser.add_argument(flag, dest=name, default=None, metavar="A,B,...",
                                help=help_text + (f" Comma-separated of {', '.join(kind[1])}." if kind[1] else
                                                  " Comma-separated."))
        else:
            parser.add_argument(flag, dest=name, type=kind[1], default=None, help=help_text)
    parser.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                        help="any field, nested ones by dotted path (engine.batch_size=8); VALUE is YAML")


def config_from_args(cls: type[C], args) -> C:
    """`cls` from args made by a parser that `add_config_arguments` set up: the YAML file, then --set, then the
    named options."""
    data = read_yaml(args.config) if getattr(args, "config", None) else {}
    for item in getattr(args, "set_options", []) or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. engine.batch_size=8)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a mapping")
            node = child
        node[leaf] = value
    for name, field in cls.model_fields.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        kind = _option_type(field.annotation)
        data[name] = [v.strip() for v in value.split(",") if v.strip()] if kind and kind[0] == "list" else value
    return build_config(cls, data, str(args.config) if getattr(args, "config", None) else cls.__name__)
