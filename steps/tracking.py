"""The MLflow edge: where the store is, the stage experiments, and the run each stage writes to.

The tracking URI comes from ``MLFLOW_TRACKING_URI``, else from a ``.env`` file in the working
directory, else MLflow's own default ``sqlite:///mlflow.db``; no server is needed for that default.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
import yaml
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Run, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from steps import contract, signals
from steps.config import Config
from steps.data import Rejected, digest

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the store is created without one
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class PipelineError(RuntimeError):
    """A stage cannot go on; the message says what to run or fix first."""


# ``scheme://user:token@host``: the user-info of any URI in a text.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, shortened and without credentials: for one-line messages."""
    return redact((str(err).splitlines() or [type(err).__name__])[0][:limit])


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``, for anything printed or logged."""
    return _USERINFO.sub("***@", text)


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
        uri = credentials_from_uri(uri)
        check_server(uri)
    elif urlparse(uri).scheme == "sqlite":
        create_sqlite_store(uri)
    # Child processes (mlflow.run of the next stage) inherit the same store through the environment.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    return uri


def credentials_from_uri(uri: str) -> str:
    """``https://user:token@host`` as ``https://host``, the user and token moved to the environment
    variables MLflow's client reads (unless already set there). Every stage, and every stage that
    ``main`` starts, then works with a URI that carries no secret, whatever prints it."""
    parsed = urlparse(uri)
    if parsed.username is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parsed.username))
    if parsed.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parsed.password))
    return parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()


def create_sqlite_store(uri: str) -> None:
    """Create (or upgrade) a SQLite store's schema in one process at a time.

    MLflow creates the tables on first use without a lock: several stages starting together on a
    new store race, fail ("table metrics already exists") and can leave the schema half made. A
    lock file beside the database serialises that first use; afterwards it costs one query.
    """
    db = Path(unquote(uri[len("sqlite:///") :]))
    if str(db) in ("", ":memory:") or fcntl is None:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def lost_server(err: BaseException) -> PipelineError | None:
    """A one-line error when ``err`` means the tracking server went away mid-run, else None."""
    uri = mlflow.get_tracking_uri()
    text = str(err)
    signs = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out", "RemoteDisconnected")
    if urlparse(uri).scheme not in ("http", "https") or not any(sign in text for sign in signs):
        return None
    return PipelineError(
        f"lost the tracking server at {redact(uri)} during the run ({redact(text.splitlines()[0][:200])}); the "
        "run could not be closed there. Rerun when the server is back: the rerun marks the lost run FAILED"
    )


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line naming the URI, when the server does not answer or refuses us.

    Without this, MLflow's client retries an unreachable server with backoff for minutes, and a
    server with authentication fails the first call deep inside a stage with a traceback.
    """
    base = uri.rstrip("/")
    headers = _auth_headers()
    opener = urllib.request.build_opener(SameOriginAuth())
    shown = redact(uri)
    try:
        # /health answers without credentials; one small API call then checks ours.
        opener.open(f"{base}/health", timeout=timeout).close()
        probe = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        opener.open(probe, timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            given = "the credentials given were refused" if headers else "no credentials were given"
            raise PipelineError(
                f"the tracking server at {shown} answered HTTP {err.code}: {given}; set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            ) from None
        # Any other answer means a server is there; MLflow reports its own errors from here on.
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = redact(str(getattr(err, "reason", err)))
        raise PipelineError(
            f"cannot reach the tracking server at {shown} ({reason}); start it (make server) "
            "or point MLFLOW_TRACKING_URI (environment or .env) at a running one"
        ) from None


class SameOriginAuth(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send credentials only to the origin they were meant for.

    urllib copies every header to wherever a redirect points, another host or https -> http
    included; MLflow's client (requests) drops ``Authorization`` there, and so do we.
    """

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in [k for k in new.headers if k.lower() == "authorization"]:
                del new.headers[name]
            new.unredirected_hdrs.pop("Authorization", None)
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    parsed = urlparse(url)
    return parsed.scheme, (parsed.hostname or "").lower(), parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)


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


VERSIONED = ("tensorflow", "keras", "mlflow", "numpy", "pillow", "pandas")


def library_versions() -> dict[str, str]:
    """Tags ``versions.<package>`` for Python and the libraries a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return {contract.TAG_VERSIONS_PREFIX + name: v for name, v in found.items()}


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
    """The stage's run in ``<stage>/<experiment>``, tagged with the process that owns it.

    Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``) and is resumed: MLflow created
    it in the experiment given to ``mlflow run``, which cannot be changed afterwards, so a run
    outside ``<stage>/<experiment>`` is only warned about. Called directly, a new run is started.
    Runs of the experiment whose process died are closed first (``reap_stale_runs``); an interrupt
    (Ctrl-C, SIGTERM) ends this run KILLED, any other exception FAILED.
    """
    wanted = contract.experiment_name(stage, experiment)
    if os.environ.get("MLFLOW_RUN_ID"):
        with mlflow.start_run() as run, _closing():
            mlflow.set_tags({contract.TAG_PROCESS: process_identity(), **library_versions()})
            actual = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
            if actual != wanted:
                logger.warning(
                    "this %s run is in experiment %r, not %r: pass --experiment-name %s to mlflow run",
                    stage,
                    actual,
                    wanted,
                    wanted,
                )
            reap_stale_runs(run.info.experiment_id)
            yield run
        return
    experiment_id = ensure_experiment(wanted)
    reap_stale_runs(experiment_id)
    with (
        mlflow.start_run(
            experiment_id=experiment_id, tags={contract.TAG_PROCESS: process_identity(), **library_versions()}
        ) as run,
        _closing(),
    ):
        yield run


@contextlib.contextmanager
def nested_run(name: str, experiment_id: str) -> Iterator[Run]:
    """A child of the active run, in its experiment (a nested run otherwise goes to the *active*
    experiment, "Default" when a step is called as a function); KILLED on an interrupt."""
    tags = {contract.TAG_PROCESS: process_identity(), **library_versions()}
    with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id, tags=tags) as run:
        with _closing():
            yield run


@contextlib.contextmanager
def _closing() -> Iterator[None]:
    """How a stage's run ends when the stage does not finish: KILLED when it was told to stop,
    even if the work under way swallowed the signal's exception or turned it into another error."""
    try:
        yield
        signals.check()
    except KeyboardInterrupt:
        # mlflow.start_run's own exit would say FAILED; an interrupted run was killed.
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except Exception as err:
        if signals.received():
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            raise signals.Terminated() from err
        if lost_server(err) is not None:
            # The server is gone: closing the runs would only retry with backoff once per run
            # before failing too. Fail those calls at once; a rerun marks these runs FAILED.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        raise


def process_identity(pid: int | None = None) -> str:
    """``<host>:<pid>:<start time>``: enough to tell later whether this process is still the one running."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux ``/proc``), so a reused PID is not mistaken."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_gone(identity: str) -> bool | None:
    """True: the process ran on this host and is gone; False: it still runs here; None: cannot tell."""
    host, _, rest = identity.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None  # another machine's process
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # running, as another user
    now = _start_ticks(pid)
    return bool(ticks and now) and now != ticks  # the PID now belongs to another process


def reap_stale_runs(experiment_id: str) -> list[str]:
    """Close the experiment's RUNNING runs whose process died; return their IDs.

    A process killed with SIGKILL (or by the out-of-memory killer), or one that lost the tracking
    server, cannot close its own run, which would then say RUNNING forever. Such a run is marked
    FAILED with the tag ``pipeline.reaped`` saying why: its process is gone from this host, or, for a
    process on another host (which cannot be checked from here), its parent run has already ended.
    """
    client = mlflow.MlflowClient()
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    still = {r.info.run_id for r in running}
    reaped = []
    for run in running:
        identity = run.data.tags.get(contract.TAG_PROCESS, "")
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        gone = process_gone(identity) if identity else None
        if gone:
            reason = f"its process {identity} is no longer running"
        elif gone is None and parent and parent not in still and _status(client, parent) not in (None, "RUNNING"):
            # Only for a process we cannot see: one still running here is left alone, whatever its parent.
            reason = f"its parent run {parent} has ended"
        else:
            continue
        logger.warning("run %s was left RUNNING but %s: marking it FAILED", run.info.run_id, reason)
        client.set_tag(run.info.run_id, contract.TAG_REAPED, reason)
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        reaped.append(run.info.run_id)
    return reaped


def _status(client: mlflow.MlflowClient, run_id: str) -> str | None:
    try:
        return client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None


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


def log_skipped(skipped: Sequence[Rejected], root: Path) -> None:
    """``n_skipped`` and, when any, ``skipped_images.csv``: every image left out and why."""
    mlflow.log_metric(contract.METRIC_N_SKIPPED, len(skipped))
    if skipped:
        frame = pd.DataFrame(
            {
                "file": [_relative(r.sample.path, root) for r in skipped],
                "class": [r.sample.cls for r in skipped],
                "reason": [r.reason for r in skipped],
            }
        )
        mlflow.log_text(frame.to_csv(index=False), contract.SKIPPED_ARTIFACT)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def load_keras(model_uri: str):
    """The Keras network of a model in the configured store, with Keras's ``safe_mode`` on.

    Safe mode refuses a file that needs code to run to load (a ``Lambda`` layer's pickled
    bytecode): a model in the registry is data, never a program. Keras defaults to it; we insist.
    A served model (``steps.serving``) holds the network as an artifact, which is loaded on its
    own, so none of the model's logged code runs here; models logged before it are Keras models.
    Refused as well, before anything is loaded: a Keras model saved as a TensorFlow SavedModel
    (``tf.saved_model.load`` knows no safe mode) and a file named outside the model's directory.
    """
    import keras

    from steps.serving import KERAS_ARTIFACT

    flavors = mlflow.models.get_model_info(model_uri).flavors
    try:
        if "keras" in flavors:
            conf = flavors["keras"]
            if conf.get("save_exported_model"):
                raise PipelineError(
                    f"refused to load {model_uri}: a Keras model saved as a TensorFlow SavedModel "
                    "(save_exported_model), which loads without Keras's safe_mode; register a .keras model"
                )
            _inside_model(model_uri, str(conf.get("data", "data")))
            return mlflow.keras.load_model(model_uri, load_model_kwargs={"safe_mode": True})
        artifact = flavors.get("python_function", {}).get("artifacts", {}).get(KERAS_ARTIFACT, {}).get("path")
        if not artifact:
            raise PipelineError(f"{model_uri} is not a model of this pipeline: it holds no Keras network")
        _inside_model(model_uri, artifact)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)).resolve()
        if not (local / artifact).resolve().is_relative_to(local):  # a link inside that leads out
            raise PipelineError(f"refused to load {model_uri}: its file {artifact!r} leads outside the model")
        return keras.saving.load_model(local / artifact, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise PipelineError(
            f"refused to load {model_uri}: it needs code execution to load (Keras safe_mode); "
            "register models built from the pipeline's own layers"
        ) from None


def _inside_model(model_uri: str, path: str) -> None:
    """Refuse an ``MLmodel`` path that is absolute or climbs out of the model's directory."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", path) or path.startswith("~"):
        raise PipelineError(f"refused to load {model_uri}: its MLmodel names {path!r}, outside the model's directory")


def pipeline_model_problem(info) -> str | None:
    """Why a logged model is not one ``train`` logged (None when it is): its ``MLmodel`` must have
    this pipeline's layout: the served model's code, the Keras network as an artifact inside the
    model, and the metadata evaluate needs."""
    from steps.serving import KERAS_ARTIFACT

    pyfunc = (info.flavors or {}).get("python_function", {})
    if (
        set(info.flavors or {}) != {"python_function"}
        or pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model"
    ):
        flavors = sorted(info.flavors or {})
        return f"its flavors are {flavors}, not the served model train logs (python_function, from code)"
    artifact = pyfunc.get("artifacts", {}).get(KERAS_ARTIFACT, {}).get("path")
    if not artifact:
        return f"it holds no Keras network (artifact {KERAS_ARTIFACT})"
    try:
        _inside_model(info.model_uri, str(artifact))
    except PipelineError as err:
        return str(err).split(": ", 1)[1]
    metadata = info.metadata or {}
    missing = [key for key in ("image_size", "classes") if key not in metadata]
    return f"its metadata has no {', '.join(missing)}" if missing else None


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, as a string (MLflow returns int or str by call), or None when
    the model or the alias does not exist. Any other error (a store that does not answer) is a
    ``PipelineError``: read as "no holder", it would hand the alias to any challenger."""
    for attempt in range(5):
        try:
            return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException as err:
            # No model: RESOURCE_DOES_NOT_EXIST; a model without the alias: INVALID_PARAMETER_VALUE, "not found".
            if err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
            ):
                return None
            if "database is locked" in str(err) and attempt < 4:  # SQLite: another process is writing
                time.sleep(0.05 * (attempt + 1))
                continue
            raise PipelineError(
                f"cannot read {name}@{alias} ({first_line(err)}); nothing was changed, rerun when the store answers"
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def get_run(run_id: str) -> Run:
    """The run, or a ``PipelineError`` saying it does not exist in this store."""
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            raise PipelineError(
                f"run {run_id!r} does not exist in {redact(mlflow.get_tracking_uri())}; run "
                "`mlflow run . -e train` first and pass its best_run_id tag as -P run_id=..."
            ) from None
        raise


if __name__ == "__main__":
    # `python -m steps.tracking`: say which store the pipeline will use, or why it cannot.
    try:
        print(f"tracking store: {redact(configure())}")
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
