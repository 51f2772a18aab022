"""The drift check as infer runs it, on copies of conftest's ``prod_world`` store (a tiny model trained and
registered as train and evaluate do): the profile the version carries, the verdicts, what the run records."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import world_config
from helpers import use_copy_of
from steps import infer
from steps.core import contract
from steps.core.config import ConfigError
from steps.core.errors import DRIFT
from steps.mlflow_io.loading import load_profile
from steps.monitoring import drift
from steps.monitoring.profile import EMBEDDING, SCORE, STATISTICS
from steps.monitoring.watch import DriftAlert

pytestmark = pytest.mark.model


@pytest.fixture
def world(prod_world, tmp_path, monkeypatch) -> Path:
    """This test's copy of the store; the tiny data set it was trained on."""
    db, _ = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    yield db.parent / "data"
    while mlflow.active_run():
        mlflow.end_run()


def shifted(data: Path, folder: Path, factor: float) -> Path:
    """Every tiny training and test image with its exposure scaled by ``factor``: 36 images, enough to judge."""
    for i, path in enumerate(sorted(data.rglob("*.png"))):
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32) * factor
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def infer_run(data: Path, tmp_path: Path, **overrides: str) -> mlflow.entities.Run:
    values = {"infer.output": str(tmp_path / "predictions.csv"), **overrides}
    run_id = infer.infer(world_config(data, tmp_path, **values))
    return mlflow.get_run(run_id)


def drift_json(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{contract.DRIFT_ARTIFACT}")


def test_the_registered_version_carries_its_reference_profile(world):
    uri = "models:/Production_Reg/1"
    profile = load_profile(uri, mlflow.models.get_model_info(uri).flavors)
    assert profile is not None and profile.embedding is not None
    assert set(profile.reference) == {*STATISTICS, SCORE, *EMBEDDING}
    assert len({len(v) for v in profile.reference.values()}) == 1 and profile.n_images >= 2
    # The validation images, at their own size: the tiny set's cells are 48 px, gray.
    assert set(profile.reference["width"]) == {48.0} and set(profile.reference["channels"]) == {1.0}


@pytest.mark.slow  # 8 s on 2 cores: make test only
def test_a_darkened_batch_raises_an_alert_with_its_figures_and_drift_fail_exits_6_after_writing(world, tmp_path):
    images = shifted(world, tmp_path / "dark", 0.3)
    run = infer_run(world, tmp_path, **{"infer.input": str(images)})
    tags, metrics = run.data.tags, run.data.metrics
    assert tags[contract.TAG_DRIFT] == drift.ALERT
    assert tags[contract.TAG_DRIFT_PARTS] == "statistics,scores,embedding"
    assert metrics["drift_n_images"] == 36 and metrics["drift_p_brightness"] < 0.05 and metrics["drift_n_alerts"] >= 1
    report = drift_json(run.info.run_id)
    assert report["verdict"] == "alert" and {t["feature"] for t in report["tests"] if t["alert"]} >= {"brightness"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {contract.DRIFT_ARTIFACT, contract.DRIFT_FIGURE} <= artifacts

    output = tmp_path / "failing.csv"
    with pytest.raises(DriftAlert, match=r"^drift alert over 36 images, .*brightness.*; every row is in") as err:
        infer_run(world, tmp_path, **{"infer.input": str(images), "infer.drift": "fail", "infer.output": str(output)})
    assert err.value.exit_code == DRIFT.exit_code == 6
    assert len(list(csv.DictReader(output.open()))) == 36  # written before the stage failed


def test_a_batch_too_small_to_judge_says_so(world, tmp_path):
    run = infer_run(world, tmp_path)  # the tiny test split: 12 images
    assert run.data.tags[contract.TAG_DRIFT] == drift.TOO_FEW
    assert not any(name.startswith("drift_") for name in run.data.metrics)
    assert drift_json(run.info.run_id)["reason"] == "12 usable images, fewer than the 20 needed to judge a batch"


def test_an_export_is_checked_on_its_statistics_and_scores_and_says_it_left_the_embedding_out(world, tmp_path):
    images = shifted(world, tmp_path / "same", 1.0)
    run = infer_run(world, tmp_path, **{"infer.input": str(images), "infer.runtime": "onnx"})
    assert run.data.tags[contract.TAG_DRIFT_PARTS] == "statistics,scores"
    report = drift_json(run.info.run_id)
    assert set(report["not_checked"]) == set(EMBEDDING)
    assert {t["feature"] for t in report["tests"]} == {*STATISTICS, SCORE}


@pytest.mark.slow  # 6 s on 2 cores: make test only
def test_a_model_logged_without_a_profile_gets_the_verdict_unavailable(world, tmp_path, monkeypatch):
    from steps.network import training
    from steps.served import packaging

    logged = packaging.log_model
    monkeypatch.setattr(training.packaging, "log_model", lambda *a, **k: logged(*a, **{**k, "profile": None}))
    from steps import train

    parent = train.train(world_config(world, tmp_path, **{"train.exports": "none"}))
    best = mlflow.get_run(parent).data.tags[contract.TAG_BEST_RUN_ID]
    run = infer_run(world, tmp_path, **{"infer.model_uri": f"runs:/{best}/model"})
    assert run.data.tags[contract.TAG_DRIFT] == drift.UNAVAILABLE
    assert "was logged without a reference profile" in drift_json(run.info.run_id)["reason"]


def test_drift_off_skips_the_check_and_a_wrong_mode_is_refused(world, tmp_path):
    run = infer_run(world, tmp_path, **{"infer.drift": "off"})
    assert contract.TAG_DRIFT not in run.data.tags
    with pytest.raises(ConfigError, match=r"infer.drift: expected one of report, fail, off, got 'loud'"):
        world_config(world, tmp_path, **{"infer.drift": "loud"})


@pytest.mark.slow  # 6 s on 2 cores: make test only
def test_monitor_checks_a_folder_without_writing_predictions(world, tmp_path, monkeypatch):
    from steps import monitor

    monkeypatch.chdir(tmp_path)
    images = shifted(world, tmp_path / "bright", 1.8)
    config = world_config(world, tmp_path, **{"infer.input": str(images)})
    run = mlflow.get_run(monitor.monitor(config))
    assert run.data.tags[contract.TAG_DRIFT] == drift.ALERT and run.data.metrics["drift_n_images"] == 36
    assert mlflow.get_experiment(run.info.experiment_id).name == f"{contract.STAGE_MONITOR}/{config.experiment}"
    assert not (tmp_path / "predictions.csv").exists() and not list(tmp_path.rglob("*.csv"))
    with pytest.raises(DriftAlert, match=r"; 36 images checked; see drift.png"):
        monitor.monitor(world_config(world, tmp_path, **{"infer.input": str(images), "infer.drift": "fail"}))
