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


def test_an_unreachable_server_fails_at_once_naming_the_uri(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.PipelineError, match=f"cannot reach the tracking server at {uri} "):
        tracking.configure()


def test_the_store_check_command_gives_one_line(tmp_path):
    import subprocess
    import sys

    from steps.config import PROJECT_DIR

    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "steps.tracking"], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the tracking server at http://127.0.0.1:9 (")
