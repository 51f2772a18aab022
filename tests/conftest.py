"""Shared fixtures: a tiny real-image data set and an isolated MLflow store per test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from steps.config import load_config
from steps.prepare import elpv_labels, elpv_split

# Small enough that one epoch of all three sets takes seconds; big enough that each class shows
# up in the validation split.
TINY_PER_CLASS = {"train": 12, "test": 6}
TINY_SIZE = 48


def make_tiny_elpv(root: Path, per_class: dict[str, int] = TINY_PER_CLASS, size: int = TINY_SIZE) -> Path:
    """Real ELPV cells, downscaled, laid out as <root>/{train,test}/{def_front,ok_front}/."""
    plan = elpv_split(elpv_labels(), ("ok_front", "def_front"))
    for (split, _cls), group in plan.groupby(["split", "class"]):
        for row in group.head(per_class[split]).itertuples():
            target = root / row.file
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(row.source) as image:
                image.resize((size, size), Image.Resampling.BILINEAR).save(target)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_elpv(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store for this test alone, in the environment too (for subprocesses)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """The real conf/ with the tiny data, small images, one epoch, in a per-test experiment."""
    return load_config(
        {
            "data.dir": str(tiny_data),
            "train.image_size": "32",
            "train.epochs": "1",
            "experiment": "test",
            "infer.output": str(tmp_path / "predictions.csv"),
        }
    )


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """cli.main configures the root logger on pytest's captured stderr; undo that after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
