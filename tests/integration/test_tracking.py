"""Unit: where the store is (environment, then .env, then the SQLite default), where artifacts go, and
which runs left RUNNING a stage closes."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from steps.core import contract, errors
from steps.mlflow_io import runs, tracking

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
    experiment_id = runs.ensure_experiment("train/unit")
    assert runs.ensure_experiment("train/unit") == experiment_id  # found, not created twice
    location = mlflow.MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "mlruns").as_uri() + "/train_unit"


def test_an_unreachable_server_fails_at_once_naming_the_uri(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(errors.PipelineError, match=f"cannot reach the tracking server at {uri} "):
        tracking.configure()


def test_the_store_check_command_gives_one_line(tmp_path):
    import subprocess
    import sys

    from steps.core.config import PROJECT_DIR

    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "steps.mlflow_io.tracking"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the tracking server at http://127.0.0.1:9 (")


def test_only_runs_whose_process_died_are_closed(store):
    """A dead process on this host, or (for another host's process) an ended parent: closed as FAILED.
    A process still running here, or another host's run whose parent still runs: left alone."""
    client = mlflow.MlflowClient()
    experiment = runs.ensure_experiment("reap/test")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = runs.process_identity(int(finished.stdout))  # that PID has exited (or now names another process)
    alive = runs.process_identity()  # this test's own process
    elsewhere = "another-host:1:1"

    def run(identity, parent=None):
        tags = {contract.TAG_PROCESS: identity, **({MLFLOW_PARENT_RUN_ID: parent} if parent else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    ended_parent = run(alive)
    client.set_terminated(ended_parent)
    running_parent = run(alive)
    made = {
        "dead": run(dead),
        "alive": run(alive),
        "alive, parent ended": run(alive, ended_parent),
        "elsewhere, parent ended": run(elsewhere, ended_parent),
        "elsewhere, parent running": run(elsewhere, running_parent),
    }
    reaped = runs.reap_stale_runs(experiment)

    assert sorted(reaped) == sorted([made["dead"], made["elsewhere, parent ended"]])
    for name, run_id in made.items():
        got = client.get_run(run_id)
        assert got.info.status == ("FAILED" if run_id in reaped else "RUNNING"), name
    assert "is no longer running" in client.get_run(made["dead"]).data.tags[contract.TAG_REAPED]
    assert (
        f"parent run {ended_parent} has ended"
        in client.get_run(made["elsewhere, parent ended"]).data.tags[contract.TAG_REAPED]
    )
