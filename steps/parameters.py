"""Every entry point's parameters, in one table: what ``MLproject`` declares, what each step's command
line accepts, which configuration key each one overrides, and what ``main`` passes to each stage.

``tests/test_config.py`` fails when ``MLproject`` and this table disagree (names, types, defaults,
the command lines). An empty value keeps the ``conf/`` value; a parameter without a configuration
key is the step's own argument (``evaluate``'s ``run_id``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from steps.config import Config


class Param(NamedTuple):
    name: str  # as in -P name=value
    key: str | None  # the configuration key it overrides; None: the step's own argument
    type: str = "string"  # MLproject's: string, int, float
    required: bool = False  # no default in MLproject: mlflow run refuses to start without it


# What main forwards to train, in both entry points' order.
TRAINING = (
    Param("hparams", "train.hparams"),
    Param("epochs", "train.epochs", "int"),
    Param("image_size", "train.image_size", "int"),
    Param("data_dir", "data.dir"),
    Param("seed", "seed", "int"),
    Param("skip_bad_images", "data.skip_bad_images"),
    Param("exports", "train.exports"),
)
PROMOTION = (
    Param("threshold", "evaluate.threshold", "float"),
    Param("min_improvement", "evaluate.min_improvement", "float"),
    Param("promote", "evaluate.promote"),
)

PARAMS: dict[str, tuple[Param, ...]] = {
    "main": (
        Param("experiment", "experiment"),
        *TRAINING,
        *PROMOTION,
        Param("input", "infer.input"),
        Param("output", "infer.output"),
        Param("env_manager", None),
        Param("reuse", None),
        Param("rerun", None),
    ),
    "prepare": (Param("data_dir", "data.dir"), Param("experiment", "experiment")),
    "train": (
        *TRAINING,
        Param("precision", "train.precision"),
        Param("deterministic", "train.deterministic"),
        Param("experiment", "experiment"),
    ),
    "evaluate": (
        Param("run_id", None, required=True),
        *PROMOTION,
        Param("data_dir", "data.dir"),
        Param("skip_bad_images", "data.skip_bad_images"),
        Param("experiment", "experiment"),
    ),
    "promote": (
        Param("version", None, "int", required=True),
        Param("reason", None, required=True),
        Param("experiment", "experiment"),
    ),
    "infer": (
        Param("input", "infer.input"),
        Param("model_uri", "infer.model_uri"),
        Param("output", "infer.output"),
        Param("engine", "infer.engine"),
        Param("spark_master", "infer.spark_master"),
        Param("allow_errors", "infer.allow_errors"),
        Param("gradcam_top", "infer.gradcam_top", "int"),
        Param("runtime", "infer.runtime"),
        Param("max_file_mb", "infer.max_file_mb", "int"),
        Param("experiment", "experiment"),
    ),
}


def overrides(entry_point: str) -> dict[str, str]:
    """``{parameter: configuration key}`` of the parameters that override ``conf/``."""
    return {p.name: p.key for p in PARAMS[entry_point] if p.key is not None}


def own(entry_point: str) -> tuple[str, ...]:
    """The step's own arguments: parameters that set no configuration key."""
    return tuple(p.name for p in PARAMS[entry_point] if p.key is None)


def value(config: Config, key: str) -> Any:
    """The resolved value of a dotted configuration key (``infer.input`` and ``infer.model_uri`` with
    their defaults filled in, as the stage itself would resolve them)."""
    resolved = {"infer.input": config.infer_input, "infer.model_uri": config.infer_model_uri}
    if key in resolved:
        return resolved[key]
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def as_parameter(given: Any) -> str:
    """A configuration value as ``mlflow run -P`` spells it: lists comma-joined, booleans lower case,
    floats exactly (``repr``)."""
    if isinstance(given, bool):
        return str(given).lower()
    if isinstance(given, list | tuple):
        return ",".join(map(str, given))
    if isinstance(given, float):
        return repr(given)
    return str(given)


def stage_arguments(entry_point: str, config: Config, changes: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What ``main`` passes to ``entry_point``: every overriding parameter at the value ``main`` resolved,
    so every stage runs on the same configuration; ``changes`` replace values; None leaves one out
    (the stage's own default, as for ``epochs`` when each set keeps its own)."""
    values = {p.name: value(config, p.key) for p in PARAMS[entry_point] if p.key is not None}
    values.update(changes or {})
    return {name: as_parameter(given) for name, given in values.items() if given is not None}
