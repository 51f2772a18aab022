"""The MLflow edge: where the store is, the stage experiments, and the run each stage writes to.

The tracking URI comes from ``MLFLOW_TRACKING_URI``, else from a ``.env`` file in the working
directory, else MLflow's own default ``sqlite:///mlflow.db``; no server is needed for that default.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import yaml
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Run

from steps import contract
from steps.config import Config
from steps.data import digest

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class PipelineError(RuntimeError):
    """A stage cannot go on; the message says what to run or fix first."""


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file; comments, blank lines and ``export`` prefixes allowed."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        values[key.strip()] = value.strip().strip("'\"")
    return values


def configure(dotenv: Path = Path(".env")) -> str:
    """Settle the tracking URI (environment, then ``.env``, then the SQLite default) and return it."""
    if dotenv.is_file():
        for key, value in read_dotenv(dotenv).items():
            os.environ.setdefault(key, value)  # the real environment wins over the file
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if urlparse(uri).scheme in ("http", "https"):
        check_server(uri)
    # Child processes (mlflow.run of the next stage) inherit the same store through the environment.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line naming the URI, when the server does not answer or refuses us.

    Without this, MLflow's client retries an unreachable server with backoff for minutes, and a
    server with authentication fails the first call deep inside a stage with a traceback.
    """
    base = uri.rstrip("/")
    headers = _auth_headers()
    try:
        # /health answers without credentials; one small API call then checks ours.
        urllib.request.urlopen(f"{base}/health", timeout=timeout).close()
        probe = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        urllib.request.urlopen(probe, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            given = "the credentials given were refused" if headers else "no credentials were given"
            raise PipelineError(
                f"the tracking server at {uri} answered HTTP {err.code}: {given}; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        # Any other answer means a server is there; MLflow reports its own errors from here on.
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(
            f"cannot reach the tracking server at {uri} ({reason}); start it (make server) "
            "or point MLFLOW_TRACKING_URI (environment or .env) at a running one"
        ) from None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send, from the same environment variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a SQLite store (``<db dir>/mlruns``), so a store moves as one folder.

    None for servers and other stores: they have their own artifact root.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db_path = Path(unquote(tracking_uri[len("sqlite:///") :])).resolve()
    return (db_path.parent / "mlruns").as_uri()


def ensure_experiment(name: str) -> str:
    """The experiment's ID, creating it (artifacts beside a SQLite store) if it does not exist."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    root = artifact_root(mlflow.get_tracking_uri())
    location = f"{root}/{name.replace('/', '_')}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another stage created it between our look-up and our create.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, experiment: str) -> Iterator[Run]:
    """The stage's run in ``<stage>/<experiment>``.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is resumed: MLflow created
    it in the experiment given to ``mlflow run``, which cannot be changed afterwards, so a run
    outside ``<stage>/<experiment>`` is only warned about. Called directly, a new run is started.
    """
    wanted = contract.experiment_name(stage, experiment)
    if os.environ.get("MLFLOW_RUN_ID"):
        with mlflow.start_run() as run:
            actual = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
            if actual != wanted:
                logger.warning(
                    "this %s run is in experiment %r, not %r: pass --experiment-name %s to mlflow run",
                    stage,
                    actual,
                    wanted,
                    wanted,
                )
            yield run
        return
    experiment_id = ensure_experiment(wanted)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        yield run


def log_config(config: Config) -> None:
    """The resolved configuration: as ``config.yaml`` and as params named ``conf.<key>``.

    Prefixed, because ``mlflow run`` has already logged the raw ``-P`` values under the plain
    names (``seed``, often empty), and MLflow refuses to change a logged param.
    """
    resolved = config.as_dict()
    mlflow.log_text(yaml.safe_dump(resolved, sort_keys=False), contract.CONFIG_ARTIFACT)
    flat = {}
    for section, values in resolved.items():
        if section == "hparam_sets":
            continue  # each child run logs its own set
        if isinstance(values, dict):
            flat.update({f"conf.{section}.{k}": v for k, v in values.items()})
        else:
            flat[f"conf.{section}"] = values
    mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()})


def log_dataset(frame: pd.DataFrame, name: str, source: Path, context: str) -> str:
    """Log a manifest as the active run's dataset input and as a CSV artifact; return its digest."""
    value = digest(frame)
    with warnings.catch_warnings():
        # MLflow registers two local-path source types with the same name and warns it picked one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = from_pandas(frame, source=str(source), name=name, digest=value)
    mlflow.log_input(dataset, context=context)
    mlflow.log_text(frame.to_csv(index=False), f"{name}_{contract.MANIFEST_ARTIFACT}")
    return value


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, as a string (MLflow returns int or str by call), or None."""
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None  # no such registered model, or no such alias on it


def get_run(run_id: str) -> Run:
    """The run, or a ``PipelineError`` saying it does not exist in this store."""
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise PipelineError(
                f"run {run_id!r} does not exist in {mlflow.get_tracking_uri()}; run "
                "`mlflow run . -e train` first and pass its best_run_id tag as -P run_id=..."
            ) from None
        raise


if __name__ == "__main__":
    # `python -m steps.tracking`: say which store the pipeline will use, or why it cannot.
    try:
        print(f"tracking store: {configure()}")
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
