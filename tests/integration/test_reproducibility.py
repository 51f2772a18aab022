"""Reproducibility: one seed gives one split, and with the determinism switch on, the same metrics."""

from __future__ import annotations

import mlflow
import pytest
import yaml
from tensorflow.python.framework import config as tf_config

from steps.core import contract
from steps.core.loader import load_config
from steps.train import train

pytestmark = [pytest.mark.model, pytest.mark.slow]

COMPARED = ("loss", "accuracy", "val_loss", "val_accuracy", "best_val_accuracy", "decision_threshold")


def child_of(client: mlflow.MlflowClient, parent_id: str):
    parent = client.get_run(parent_id)
    (child,) = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return parent, child


def test_the_same_seed_with_determinism_on_gives_the_same_split_and_metrics(tiny_data, store, tmp_path):
    config = load_config(
        {
            "data.dir": str(tiny_data),
            "train.image_size": "32",
            "train.epochs": "2",
            "train.hparams": "small",
            "train.deterministic": "true",
            "train.exports": "none",
            "experiment": "repro",
            "infer.output": str(tmp_path / "p.csv"),
        }  # fmt: skip
    )
    try:
        runs = [train(config), train(config)]
    finally:
        tf_config.disable_op_determinism()  # process-wide: leave the other tests as they were
    client = mlflow.MlflowClient()
    (parent_a, child_a), (parent_b, child_b) = (child_of(client, run) for run in runs)

    def text(run, path):
        return mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{path}")

    # One split: the same validation files, the same digest of the training files.
    assert text(parent_a, "val_manifest.csv") == text(parent_b, "val_manifest.csv")
    assert parent_a.data.tags[contract.TAG_DATA_DIGEST] == parent_b.data.tags[contract.TAG_DATA_DIGEST]
    # The same numbers, epoch by epoch, to the last bit.
    for metric in COMPARED:
        history = [[m.value for m in client.get_metric_history(c.info.run_id, metric)] for c in (child_a, child_b)]
        assert history[0] == history[1] and history[0], metric
    # What produced them is on record: the resolved configuration and the library versions.
    resolved = yaml.safe_load(text(parent_a, contract.CONFIG_ARTIFACT))
    assert resolved["train"]["deterministic"] is True and resolved["seed"] == config.seed
    for run in (parent_a, child_a):
        assert run.data.tags["versions.tensorflow"] and run.data.tags["versions.numpy"]
