"""What a stage records in its run besides metrics: the resolved configuration, dataset inputs and
their manifests, the images left out, and the library versions."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow.data.pandas_dataset import from_pandas

from steps.core import contract
from steps.core.config import Config
from steps.datasets.data import Rejected, digest

VERSIONED = ("tensorflow", "keras", "mlflow", "numpy", "pillow", "pandas")


def library_versions() -> dict[str, str]:
    """Tags ``versions.<package>`` for Python and the libraries a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return {contract.TAG_VERSIONS_PREFIX + name: v for name, v in found.items()}


def log_config(config: Config) -> None:
    """The resolved configuration: as ``config.yaml`` and as params named ``conf.<key>``.

    Prefixed, because ``mlflow run`` has already logged the raw ``-P`` values under the plain
    names (``seed``, often empty), and MLflow refuses to change a logged param.
    """
    resolved = config.as_dict()
    mlflow.log_text(yaml.safe_dump(resolved, sort_keys=False), contract.CONFIG_ARTIFACT)
    flat = {}
    for section, values in resolved.items():
        if section == "hparam_sets":
            continue  # each child run logs its own set
        if isinstance(values, dict):
            flat.update({f"conf.{section}.{k}": v for k, v in values.items()})
        else:
            flat[f"conf.{section}"] = values
    mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()})


def log_dataset(frame: pd.DataFrame, name: str, source: Path, context: str) -> str:
    """Log a manifest as the active run's dataset input and as a CSV artifact; return its digest."""
    value = digest(frame)
    with warnings.catch_warnings():
        # MLflow registers two local-path source types with the same name and warns it picked one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = from_pandas(frame, source=str(source), name=name, digest=value)
    mlflow.log_input(dataset, context=context)
    mlflow.log_text(frame.to_csv(index=False), f"{name}_{contract.MANIFEST_ARTIFACT}")
    return value


def log_skipped(skipped: Sequence[Rejected], root: Path) -> None:
    """``n_skipped`` and, when any, ``skipped_images.csv``: every image left out and why."""
    mlflow.log_metric(contract.METRIC_N_SKIPPED, len(skipped))
    if skipped:
        frame = pd.DataFrame(
            {
                "file": [_relative(r.sample.path, root) for r in skipped],
                "class": [r.sample.cls for r in skipped],
                "reason": [r.reason for r in skipped],
            }
        )
        mlflow.log_text(frame.to_csv(index=False), contract.SKIPPED_ARTIFACT)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
