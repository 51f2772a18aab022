"""What an MLflow error means, decided in one place: by its error code where MLflow gives a specific
one, else by one text match per case (``tests/integration/test_mlflow_errors.py`` pins each against the real MLflow
error, so an MLflow release that rewords one fails there, not in production)."""

from __future__ import annotations

from mlflow.exceptions import MlflowException

# A write that lost a race inside MLflow's SQL store (tag and alias writes are a read and then an
# insert or update): SQLite's and PostgreSQL's words for it; MLflow gives it no code of its own.
_WRITE_RACE = ("UNIQUE constraint failed", "IntegrityError", "duplicate key value", "database is locked")
# A SQLite store held by another writer for longer than its timeout (an OperationalError's text).
LOCKED = "database is locked"
# A tracking server that did not answer: requests' and urllib3's words, surfacing through MLflow's client.
_LOST_SERVER = ("Max retries exceeded", "Connection refused", "ConnectionError", "Read timed out", "RemoteDisconnected")


def missing(err: MlflowException) -> bool:
    """A run, experiment, registered model or version that does not exist (MLflow's own code)."""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST"


def alias_not_found(err: MlflowException) -> bool:
    """A registered model without the alias asked for: MLflow answers INVALID_PARAMETER_VALUE, as for
    any bad argument, with the words "not found"."""
    return err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)


def write_race(err: BaseException) -> bool:
    return any(text in str(err) for text in _WRITE_RACE)


def locked(err: BaseException) -> bool:
    return LOCKED in str(err)


def lost_server(err: BaseException) -> bool:
    return any(sign in str(err) for sign in _LOST_SERVER)
