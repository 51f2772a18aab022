"""Unit: where the store is (environment, then .env, then the SQLite default) and where artifacts go."""

from __future__ import annotations

import mlflow
import pytest

from steps import tracking

pytestmark = pytest.mark.unit


def test_dotenv_lines_are_parsed_like_a_shell_would(tmp_path):
    path = tmp_path / ".env"
    path.write_text("# comment\n\nexport MLFLOW_TRACKING_URI='http://127.0.0.1:5000'\nA=\"b=c\"\nnot a pair\n")
    assert tracking.read_dotenv(path) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "A": "b=c"}


def test_environment_wins_over_dotenv_which_wins_over_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.configure(tmp_path / ".env") == "sqlite:///mlflow.db"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (tmp_path / ".env").write_text("MLFLOW_TRACKING_URI=sqlite:///from-dotenv.db\n")
    assert tracking.configure(tmp_path / ".env") == "sqlite:///from-dotenv.db"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert tracking.configure(tmp_path / ".env") == "sqlite:///from-env.db"
    assert mlflow.get_tracking_uri() == "sqlite:///from-env.db"


def test_artifacts_sit_beside_a_sqlite_store_and_nowhere_special_for_a_server(tmp_path):
    assert tracking.artifact_root(f"sqlite:///{tmp_path}/store/mlflow.db") == (tmp_path / "store" / "mlruns").as_uri()
    assert tracking.artifact_root("http://127.0.0.1:5000") is None


def test_stage_experiments_keep_their_artifacts_in_the_store_folder(store, tmp_path):
    experiment_id = tracking.ensure_experiment("train/unit")
    assert tracking.ensure_experiment("train/unit") == experiment_id  # found, not created twice
    location = mlflow.MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlruns").as_uri() + "/train_unit"
