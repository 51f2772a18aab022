"""The tracking store: where it is, that it answers, and credentials kept out of what is printed.

The tracking URI comes from ``MLFLOW_TRACKING_URI``, else from a ``.env`` file in the working
directory, else MLflow's own default ``sqlite:///mlflow.db``; no server is needed for that default.
``python -m steps.mlflow_io.tracking`` (``make run`` calls it) says which store the pipeline will use.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow

from steps.core.errors import PipelineError, StoreError, first_line, redact
from steps.mlflow_io import mlflow_errors

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the store is created without one
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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
        if not db.exists():
            # MLflow's client would make the Default experiment's artifact folder ./mlruns/0 of
            # whatever directory this runs in; beside the database, the store is one folder.
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifact_root(uri)).engine.dispose()
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def store_failure(err: BaseException) -> StoreError | None:
    """A one-line error when ``err`` means the store did not answer (a lost server, a SQLite store
    locked by another writer for longer than its timeout), else None."""
    uri = mlflow.get_tracking_uri()
    first = first_line(err)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https") and mlflow_errors.lost_server(err):
        return StoreError(
            f"lost the tracking server at {redact(uri)} during the run ({first}); the run could not be closed "
            "there. Rerun when the server is back: the rerun marks the lost run FAILED"
        )
    if scheme == "sqlite" and mlflow_errors.locked(err):
        return StoreError(
            f"the store {redact(uri)} stayed locked by another process's write ({mlflow_errors.LOCKED}); rerun "
            "when it has finished, or use a tracking server (make server) for many writers at once"
        )
    return None


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


if __name__ == "__main__":
    # `python -m steps.mlflow_io.tracking`: say which store the pipeline will use, or why it cannot.
    try:
        print(f"tracking store: {redact(configure())}")
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
