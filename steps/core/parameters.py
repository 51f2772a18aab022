"""Every entry point's parameters, in one table: what ``MLproject`` declares, what each step's command
line accepts, which configuration key each one overrides, and what ``main`` passes to each stage.

``tests/unit/test_config.py`` fails when ``MLproject`` and this table disagree (names, types, defaults,
the command lines). An empty value keeps the ``conf/`` value; a parameter without a configuration
key is the step's own argument (``evaluate``'s ``run_id``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple

from steps.core.config import PROJECT_DIR, Config
from steps.core.errors import PipelineError


class Param(NamedTuple):
    name: str  # as in -P name=value
    key: str | None  # the configuration key it overrides; None: the step's own argument
    type: str = "string"  # MLproject's: string, int, float
    required: bool = False  # no default in MLproject: mlflow run refuses to start without it
    help: str = ""  # MLproject's comment on the parameter
    default: str = ""  # empty: the value in conf/
    choices: tuple[str, ...] = ()  # a step's own argument: the values it accepts (any case; empty keeps the default)


# What main forwards to train, in both entry points' order.
TRAINING = (
    Param("hparams", "train.hparams", help="comma-separated sets of conf/hparams.yaml"),
    Param("epochs", "train.epochs", "int", help="overrides every set's epochs"),
    Param("image_size", "train.image_size", "int"),
    Param("data_dir", "data.dir"),
    Param("seed", "seed", "int"),
    Param("skip_bad_images", "data.skip_bad_images", help="true: leave out unreadable images, counted"),
    Param("exports", "train.exports", help="onnx,litert (the default), one of them, or none"),
    Param("threshold_objective", "train.threshold_objective", help="balanced_accuracy, f1, min_recall:0.95, ..."),
)
PROMOTION = (
    Param("threshold", "evaluate.threshold", "float", help="test accuracy needed for Production_Reg"),
    Param("min_improvement", "evaluate.min_improvement", "float", help="over the prod champion, on the same test set"),
    Param("promote", "evaluate.promote", help="false: register without moving prod (CI on a branch)"),
    Param("promotion", "evaluate.promotion", help="highest (acc), or significant (McNemar p < 0.05 over prod)"),
)

PARAMS: dict[str, tuple[Param, ...]] = {
    "main": (
        Param("experiment", "experiment"),
        *TRAINING,
        *PROMOTION,
        Param("input", "infer.input", help="images to score; default <data_dir>/test"),
        Param("output", "infer.output", help="predictions, .csv or .jsonl"),
        Param(
            "env_manager",
            None,
            help="for the nested stage runs",
            default="local",
            choices=("local", "uv", "virtualenv", "conda"),
        ),
        Param(
            "reuse",
            None,
            help="empty or true: reuse finished stages; false: none; all: infer too",
            choices=("true", "false", "all"),
        ),
        Param("rerun", None, help="stages to run again, and all after them: train,evaluate"),
    ),
    "prepare": (Param("data_dir", "data.dir"), Param("experiment", "experiment")),
    "train": (
        *TRAINING,
        Param("precision", "train.precision", help="auto, float32, mixed_bfloat16, mixed_float16"),
        Param("deterministic", "train.deterministic", help="true: same seed, same metrics (slower)"),
        Param("workers", "train.workers", "int", help="training processes on this machine (docs/distributed.md)"),
        Param("worker_timeout", "train.worker_timeout", "float", help="seconds a worker waits for the others"),
        Param("experiment", "experiment"),
    ),
    "evaluate": (
        Param("run_id", None, required=True, help="required: a train run (parent or child)"),
        *PROMOTION,
        Param("data_dir", "data.dir"),
        Param("skip_bad_images", "data.skip_bad_images", help="true: leave out unreadable images, counted"),
        Param("experiment", "experiment"),
    ),
    "promote": (
        Param("version", None, "int", required=True, help="required: a version of Production_Reg"),
        Param("reason", None, required=True, help="required: kept in the history"),
        Param("experiment", "experiment"),
    ),
    "infer": (
        Param("input", "infer.input", help="a file, a directory (recursive) or a glob; default <data_dir>/test"),
        Param("model_uri", "infer.model_uri", help="default models:/Production_Reg@prod"),
        Param("output", "infer.output", help=".csv or .jsonl"),
        Param("engine", "infer.engine", help="local, or spark (mlflow.pyfunc.spark_udf)"),
        Param("spark_master", "infer.spark_master", help="default local[*]; a cluster's master URL"),
        Param("allow_errors", "infer.allow_errors", help="true: exit 0 even if some images were unreadable"),
        Param("gradcam_top", "infer.gradcam_top", "int", help="Grad-CAM grid of the N most confident defects"),
        Param("runtime", "infer.runtime", help="keras, or the onnx or litert export"),
        Param("max_file_mb", "infer.max_file_mb", "int", help="larger files are not read (their row says why)"),
        Param("drift", "infer.drift", help="report, fail (an alert fails the stage) or off"),
        Param("review_top", "infer.review_top", "int", help="the N images nearest the cut-off, to label (0: none)"),
        Param("review_dir", "infer.review_dir", help="also write the review queue to <review_dir>/<run ID>/"),
        Param("experiment", "experiment"),
    ),
    "label": (
        Param("review", None, required=True, help="required: a filled-in review.csv, or a folder per class"),
        Param("data_dir", "data.dir"),
        Param("experiment", "experiment"),
    ),
    "monitor": (
        Param("input", "infer.input", help="a file, a directory (recursive) or a glob; default <data_dir>/test"),
        Param("model_uri", "infer.model_uri", help="default models:/Production_Reg@prod"),
        Param("runtime", "infer.runtime", help="keras (the embedding too), or the onnx or litert export"),
        Param("drift", "infer.drift", help="fail: exit 6 on an alert; else only report"),
        Param("max_file_mb", "infer.max_file_mb", "int", help="larger files are not read"),
        Param("experiment", "experiment"),
    ),
}


def overrides(entry_point: str) -> dict[str, str]:
    """``{parameter: configuration key}`` of the parameters that override ``conf/``."""
    return {p.name: p.key for p in PARAMS[entry_point] if p.key is not None}


def own(entry_point: str) -> tuple[str, ...]:
    """The step's own arguments: parameters that set no configuration key."""
    return tuple(p.name for p in PARAMS[entry_point] if p.key is None)


def check_choices(entry_point: str, given: Mapping[str, str]) -> None:
    """Refuse a step's own argument outside its ``choices``, in one line naming the parameter."""
    for p in PARAMS[entry_point]:
        text = given.get(p.name, "")
        if p.choices and text.strip() and text.strip().lower() not in p.choices:
            raise PipelineError(f"parameter {p.name}: expected one of {', '.join(p.choices)}, got {text!r}")


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


# --- MLproject, written from the table ------------------------------------------------------

MLPROJECT = PROJECT_DIR / "MLproject"
_HEADER = """\
# MLflow Project: `mlflow run . -e <entry point> -P name=value --env-manager local`.
# Written by `make mlproject` from steps/core/parameters.py, the parameters' one home; `make lint` fails
# when this file differs. An empty default means "the value in conf/pipeline.yaml"; every value is
# type- and range-checked by steps/core/config.py before any work starts (MLflow does not check int or float).
name: defect-detection

python_env: python_env.yaml

entry_points:
"""


# What each entry point does, one line each: MLproject's comment above it.
PURPOSE = {
    "main": "train, evaluate and infer, chained; finished stages are reused (docs/stages.md)",
    "prepare": "only fills data/ from the elpv-dataset package (train and evaluate do this themselves)",
    "train": "the selected hyperparameter sets, one nested run each; tags best_run_id",
    "evaluate": "scores a train run's best model on data/test, registers it, moves prod by the rule",
    "promote": 'moves prod by hand (a rollback), on the record: -P version=3 -P reason="why"',
    "infer": "scores images with models:/Production_Reg@prod (or model_uri)",
    "label": "adds reviewed images to data/train, all or nothing; refuses copies of test images",
    "monitor": "checks a folder for drift against the model's reference profile, without predictions",
}


def _wrap(words: list[str], indent: str, width: int = 104) -> list[str]:
    lines, line = [], ""
    for word in words:
        if line and len(indent) + len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, indent + line]


def mlproject_text() -> str:
    """The ``MLproject`` file this table declares: every entry point, its typed parameters with their
    defaults and a comment each, and its command line."""
    out = [_HEADER]
    for entry, params in PARAMS.items():
        out.append(f"  {entry}:\n    # {PURPOSE[entry]}\n    parameters:\n")
        for p in params:
            spec = f"{{type: {p.type}}}" if p.required else f"{{type: {p.type}, default: {p.default or chr(34) * 2}}}"
            line = f"      {p.name}: {spec}"
            out.append((f"{line:<52} # {p.help}" if p.help else line) + "\n")
        words = [f"python -m steps.{entry}", *(f"--{p.name}={{{p.name}}}" for p in params)]
        out.append("    command: >-\n" + "\n".join(_wrap(words, "      ")) + "\n\n")
    return "".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    # `python -m steps.core.parameters` (make mlproject) writes MLproject; `--check` (make lint) fails on a difference.
    if sys.argv[1:] == ["--check"]:
        if MLPROJECT.read_text() != mlproject_text():
            print("error: MLproject differs from steps/core/parameters.py: run `make mlproject`", file=sys.stderr)
            raise SystemExit(1)
    else:
        MLPROJECT.write_text(mlproject_text())
        print(f"wrote {MLPROJECT}")
