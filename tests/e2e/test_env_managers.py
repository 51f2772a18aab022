"""End to end: `mlflow run --env-manager uv` builds the project's environment from python_env.yaml.

Where uv and the pinned interpreter are both present; otherwise skipped, saying which is missing.
The environment is built in a fresh folder, so the test proves python_env.yaml and
requirements.txt are enough to train, not that some earlier environment was.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from helpers import PROJECT_DIR, mlflow_run
from steps.core import contract

pytestmark = pytest.mark.e2e

PYTHON = str(yaml.safe_load((PROJECT_DIR / "python_env.yaml").read_text())["python"])


def uv_interpreter() -> str | None:
    """Why the uv path cannot run here, or None when it can."""
    uv = shutil.which("uv")
    if uv is None:
        return "uv is not installed (pip install uv)"
    # `uv python find` only looks; it never downloads (no download could reach python.org here).
    found = subprocess.run([uv, "python", "find", PYTHON], capture_output=True, text=True)
    if found.returncode != 0:
        return f"uv finds no Python {PYTHON} (python_env.yaml) on this machine"
    return None


@pytest.mark.skipif(uv_interpreter() is not None, reason=str(uv_interpreter()))
def test_train_runs_in_an_environment_uv_builds_from_python_env_yaml(store, tiny_data, tmp_path, monkeypatch):
    env_root = tmp_path / "envs"
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(env_root))
    params = {"data_dir": str(tiny_data), "epochs": "1", "image_size": "32", "hparams": "small", "experiment": "uv",
              "exports": "none"}  # fmt: skip
    done = mlflow_run("train", params, store, experiment="train/uv", env_manager="uv")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "using uv" in done.stderr

    # The stage ran inside the new environment, and TensorFlow, Keras and MLflow were there.
    (env,) = list(env_root.iterdir())
    assert (Path(env) / "bin" / "python").exists()
    assert f"source {env}/bin/activate" in done.stderr
    experiment = mlflow.MlflowClient().get_experiment_by_name("train/uv")
    (parent,) = mlflow.search_runs(
        [experiment.experiment_id], "tags.`mlflow.parentRunId` IS NULL", output_format="list"
    )
    assert parent.info.status == "FINISHED" and contract.TAG_BEST_RUN_ID in parent.data.tags
