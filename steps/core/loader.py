"""Loading the configuration: ``conf/pipeline.yaml`` and ``conf/hparams.yaml`` with dotted-key overrides, into the
typed dataclasses of ``steps.core.config``, every key checked against its field's type; an unknown key or a
wrong type is a ``ConfigError`` naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from steps.core.config import CONF_DIR, Config, ConfigError, HParams


def load_config(overrides: Mapping[str, str] | None = None, conf_dir: Path = CONF_DIR) -> Config:
    """Read ``conf/pipeline.yaml`` and ``conf/hparams.yaml``, apply dotted-key overrides."""
    raw = _read_yaml(conf_dir / "pipeline.yaml")
    for key, text in (overrides or {}).items():
        _apply_override(raw, key, text)
    hparam_raw = _read_yaml(conf_dir / "hparams.yaml")
    hparam_sets = {name: _build(HParams, values, f"hparams.yaml: {name}") for name, values in hparam_raw.items()}
    return _build(Config, {**raw, "hparam_sets": hparam_sets}, "")


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """The configuration ``Config.as_dict`` gave, checked as a loaded one is (a worker gets its chief's so)."""
    sets = {name: _build(HParams, v, f"hparams.yaml: {name}") for name, v in values.get("hparam_sets", {}).items()}
    return _build(Config, {**values, "hparam_sets": sets}, "")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), "configuration file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(str(path), f"not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "expected a mapping at the top level")
    return data


def _apply_override(raw: dict[str, Any], dotted: str, text: str) -> None:
    """Set ``raw[a][b] = text`` for ``a.b``; the string is parsed later against the field's type."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(dotted, f"{part!r} is not a section")
    node[leaf] = _FromCli(text)


class _FromCli(str):
    """A string that came from the command line, to be parsed into the field's type."""


def _build(cls: type, values: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(values, Mapping):
        raise ConfigError(where or "configuration", f"expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(_join(where, unknown[0]), f"unknown key; expected one of {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(key, "missing")
            continue
        kwargs[name] = _coerce(hints[name], values[name], key)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # Nested checks name the key relative to their section; hparam sets need the set's name.
        if where.startswith("hparams.yaml") and not err.key.startswith("hparams.yaml"):
            raise ConfigError(f"{where}.{err.key}", err.problem) from None
        raise


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, _FromCli) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if isinstance(value, _FromCli):
            value = [_FromCli(part.strip()) for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, key) for v in value)
    if origin in (Mapping, dict) or tp is Mapping:
        return dict(value)
    if tp is bool:
        if isinstance(value, _FromCli) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, _FromCli):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(key, f"expected an integer, got {str(value)!r}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, _FromCli):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {str(value)!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(key, f"expected a string, got {value!r}")
    raise TypeError(f"{key}: unsupported configuration type {tp!r}")  # a bug in this module
