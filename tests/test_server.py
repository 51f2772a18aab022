"""End to end against a real tracking server: `mlflow server` on loopback, the pipeline over HTTP.

The server serves the artifacts itself (the artifacts proxy), as `make server` starts it, with a
SQLite backend and, where PostgreSQL is installed, with a PostgreSQL backend as a team would run
it. Nothing reaches the store but through HTTP.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from helpers import PROJECT_DIR, mlflow_run
from steps import contract, tracking

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """Where PostgreSQL's server programs are: on PATH, or where Debian's postgresql package puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on loopback; its SQLAlchemy URI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does this)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (requirements-dev.txt has it)")
    # The server refuses to run as root: run it as the postgres user where we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp_path: that sits in a root-only folder the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start")
    try:
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    return request.getfixturevalue("postgres")


@contextlib.contextmanager
def running_server(tmp_path: Path, backend: str, *extra: str, env: dict[str, str] | None = None):
    """`mlflow server` on a free loopback port, as `make server` starts it; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"), *extra]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, **(env or {})}
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                    break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield uri
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.fixture
def server(backend, tmp_path, monkeypatch):
    with running_server(tmp_path, backend) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri


def test_the_whole_pipeline_runs_against_a_tracking_server(server, backend, tiny_data, tmp_path):
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
