"""End to end against a real tracking server: `mlflow server` on loopback, the pipeline over HTTP.

The server serves the artifacts itself (the artifacts proxy), with a SQLite backend, as `make
server` starts it. Nothing reaches the store but through HTTP. The server is first lost in the
middle of a training, then restarted at the same address, and the whole pipeline reruns against
it. (A PostgreSQL-backed server, as a team would run it, is raced by tests/e2e/test_concurrency.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from helpers import (
    PROJECT_DIR,
    assert_store_consistent,
    empty_store,
    free_port,
    mlflow_run,
    mlflow_run_command,
    running_server,
    wait_for_epochs,
)
from steps.core import contract, errors
from steps.mlflow_io import tracking

pytestmark = pytest.mark.e2e


# `python -m steps.train ARGS`, but importing TensorFlow (most of its start-up) while the server
# starts, and calling the step once the server answers.
TRAIN_WHEN_UP = """
import runpy, sys, time, urllib.request
import steps.train
while True:
    try:
        urllib.request.urlopen(sys.argv[1] + "/health", timeout=1).close()
        break
    except OSError:
        time.sleep(0.2)
sys.argv = ["steps.train", *sys.argv[2:]]
runpy.run_module("steps.train", run_name="__main__")
"""


def lose_the_server_mid_training(tmp_path, backend: str, port: int, tiny_data) -> tuple[str, str]:
    """Start the server and a training against it; stop the server mid-training.

    Returns the server's URI and the training's stderr once it has stopped.
    """
    uri = f"http://127.0.0.1:{port}"
    # Retry once, without backoff: MLflow's default rides out about four minutes of outage per call.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
             "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}  # fmt: skip
    env = {**os.environ, **quick, "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    args = ["--data_dir", str(tiny_data), "--hparams", "small", "--image_size", "32", "--epochs", "500",
            "--experiment", "server", "--exports", "none"]  # fmt: skip
    lost = subprocess.Popen(
        [sys.executable, "-c", TRAIN_WHEN_UP, uri, *args], env=env, cwd=PROJECT_DIR, stderr=subprocess.PIPE, text=True
    )
    with running_server(tmp_path, backend, port=port):
        client = mlflow.MlflowClient(uri)
        wait_for_epochs(client, "train/server", 1, lost)  # training is under way
    _, stderr = lost.communicate(timeout=180)  # the server is gone now, mid-training
    assert lost.returncode == 4, stderr[-3000:]  # a store failure
    return uri, stderr


def test_a_lost_server_stops_a_stage_in_one_line_and_the_pipeline_reruns_against_it(tiny_data, tmp_path, monkeypatch):
    backend, port = empty_store(tmp_path / "server.db"), free_port()
    uri, stderr = lose_the_server_mid_training(tmp_path, backend, port, tiny_data)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: lost the tracking server at {uri} during the run (")
    assert "Rerun when the server is back" in errors[0] and "Traceback" not in stderr

    with running_server(tmp_path, backend, port=port):  # back, at the same address: the whole pipeline
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        check_the_pipeline_over_http(uri, tiny_data, tmp_path)


def check_the_pipeline_over_http(server: str, tiny_data, tmp_path) -> None:
    client = mlflow.MlflowClient()  # over HTTP
    lost = {r.info.run_id for r in client.search_runs([client.get_experiment_by_name("train/server").experiment_id])}
    assert len(lost) == 2  # the lost training's parent and child, left RUNNING on the server
    output = tmp_path / "predictions.csv"
    params = {"data_dir": str(tiny_data), "epochs": "1", "image_size": "32", "hparams": "small",
              "experiment": "server", "threshold": "0.0", "output": str(output), "exports": "none"}  # fmt: skip
    done = mlflow_run("main", params, server, experiment="pipeline/server")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    # The runs the lost training could not close were closed by the rerun's train stage.
    for run_id in lost:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "is no longer running" in run.data.tags[contract.TAG_REAPED]

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
    assert_store_consistent(client)


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
    with running_server(tmp_path, empty_store(tmp_path / "server.db"), "--app-name", "basic-auth", env=env) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(errors.PipelineError) as err:
            tracking.configure()
        assert str(err.value).startswith(f"the tracking server at {uri} answered HTTP 401: the credentials given")

        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(errors.PipelineError, match="answered HTTP 401: no credentials were given; set"):
            tracking.configure()

        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right-password-1234")
        assert tracking.configure() == uri

        # Two real `mlflow run`s, started together: credentials in the environment (as the README
        # says), and in the URI, which the stage moves into the environment and prints without them.
        # The outer `mlflow run` is MLflow's: it prints its run's URL with the URI as given, unless
        # MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT is set, which `make` sets for such a URI.
        params = {"run_id": "0" * 32, "experiment": "auth"}
        # Created first: two `mlflow run`s creating one experiment at the same moment race in MLflow.
        mlflow.MlflowClient(uri).create_experiment("eval/auth")
        in_environment = mlflow_run_command("evaluate", params, uri, "eval/auth")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        with_user = uri.replace("http://", "http://admin:right-password-1234@")
        in_uri = mlflow_run_command("evaluate", params, with_user, "eval/auth")
        started = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for cmd, env in (in_environment, in_uri)]  # fmt: skip
        for process in started:
            stdout, stderr = process.communicate(timeout=600)
            printed = stdout + stderr
            assert process.returncode != 0 and "right-password-1234" not in printed
            assert f"error: run '{'0' * 32}' does not exist in {uri}; run" in printed, printed[-3000:]
