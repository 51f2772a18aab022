"""End to end against a real tracking server: `mlflow server` on loopback, the pipeline over HTTP.

The server serves the artifacts itself (the artifacts proxy), with a SQLite backend, as `make
server` starts it. Nothing reaches the store but through HTTP. (A PostgreSQL-backed server, as a
team would run it, is raced by tests/test_concurrency.py.)
"""

from __future__ import annotations

import mlflow
import pytest

from helpers import PROJECT_DIR, mlflow_run, running_server
from steps import contract, tracking

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path, monkeypatch):
    with running_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}") as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri


def test_the_whole_pipeline_runs_against_a_tracking_server(server, tiny_data, tmp_path):
    output = tmp_path / "predictions.csv"
    params = {"data_dir": str(tiny_data), "epochs": "1", "image_size": "32", "hparams": "small",
              "experiment": "server", "threshold": "0.0", "output": str(output)}  # fmt: skip
    done = mlflow_run("main", params, server, experiment="pipeline/server")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    client = mlflow.MlflowClient()  # over HTTP
    experiment = client.get_experiment_by_name("pipeline/server")
    main_run = client.search_runs([experiment.experiment_id])[0]
    tags = main_run.data.tags
    train_run = client.get_run(tags[contract.TAG_TRAIN_RUN_ID])
    children = client.search_runs(
        [train_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{train_run.info.run_id}'"
    )
    assert [c.data.tags[contract.TAG_HPARAM_SET] for c in children] == ["small"]

    version = client.get_model_version("Production_Reg", tags[contract.TAG_REGISTERED_VERSION])
    eval_run = client.get_run(tags[contract.TAG_EVAL_RUN_ID])
    assert float(version.tags["acc"]) == eval_run.data.metrics["test_accuracy"]
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == str(version.version)

    # infer loaded the model back from the server, and its predictions went to the server too.
    infer_run = client.get_run(tags[contract.TAG_INFER_RUN_ID])
    assert infer_run.data.tags[contract.TAG_MODEL_VERSION] == str(version.version)
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=infer_run.info.run_id, artifact_path="predictions.csv", dst_path=str(tmp_path / "back")
    )
    assert open(downloaded).read() == output.read_text()

    # Every artifact went through the server into its own artifact store, none beside the project.
    assert any((tmp_path / "artifacts").rglob("MLmodel"))
    assert eval_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert not (PROJECT_DIR / "mlruns" / "train_server").exists()


def test_a_server_with_authentication_refuses_wrong_credentials_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("flask_wtf", reason="the basic-auth server needs mlflow[auth] (requirements-dev.txt)")
    config = tmp_path / "auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        "admin_username = admin\nadmin_password = right-password-1234\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only"}
    with running_server(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", "--app-name", "basic-auth", env=env) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(tracking.PipelineError) as err:
            tracking.configure()
        assert str(err.value).startswith(f"the tracking server at {uri} answered HTTP 401: the credentials given")

        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(tracking.PipelineError, match="answered HTTP 401: no credentials were given; set"):
            tracking.configure()

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-password-1234")
        assert tracking.configure() == uri
