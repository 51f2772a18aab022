"""Unit: each meaning ``steps.mlflow_io.mlflow_errors`` reads from an MLflow error, against the error the
installed MLflow really raises (a rewording in a new release fails here)."""

from __future__ import annotations

import sqlite3

import mlflow
import pytest
import requests
from sqlalchemy.exc import IntegrityError, OperationalError

from steps.mlflow_io import mlflow_errors

pytestmark = pytest.mark.unit


def raised(call, *args) -> mlflow.exceptions.MlflowException:
    with pytest.raises(mlflow.exceptions.MlflowException) as err:
        call(*args)
    return err.value


def test_a_missing_run_model_or_version_is_told_by_its_code(store):
    client = mlflow.MlflowClient()
    for err in (
        raised(client.get_run, "0" * 32),
        raised(client.get_registered_model, "Nowhere_Reg"),
        raised(client.get_model_version_by_alias, "Nowhere_Reg", "prod"),
    ):
        assert mlflow_errors.missing(err) and not mlflow_errors.alias_not_found(err), err


def test_an_alias_a_registered_model_does_not_have_is_told_apart_from_other_bad_arguments(store):
    client = mlflow.MlflowClient()
    client.create_registered_model("Production_Reg")
    no_alias = raised(client.get_model_version_by_alias, "Production_Reg", "prod")
    assert mlflow_errors.alias_not_found(no_alias) and not mlflow_errors.missing(no_alias)
    bad_argument = raised(client.set_registered_model_alias, "Production_Reg", "prod", "not a number")
    assert not mlflow_errors.alias_not_found(bad_argument)


def test_a_collided_write_and_a_locked_store_are_told_by_their_database_words(tmp_path):
    db = sqlite3.connect(tmp_path / "x.db")
    db.execute("create table t (k primary key)")
    db.execute("insert into t values (1)")
    with pytest.raises(sqlite3.IntegrityError) as unique:
        db.execute("insert into t values (1)")
    assert mlflow_errors.write_race(IntegrityError("insert", {}, unique.value))
    locked = OperationalError("update", {}, sqlite3.OperationalError("database is locked"))
    assert mlflow_errors.locked(locked) and mlflow_errors.write_race(locked)
    assert not mlflow_errors.write_race(ValueError("expected an integer"))


def test_a_server_that_does_not_answer_is_told_by_the_http_clients_words():
    with pytest.raises(requests.exceptions.ConnectionError) as refused:
        requests.get("http://127.0.0.1:9/api", timeout=2)  # the discard port: nothing listens
    assert mlflow_errors.lost_server(refused.value)
    assert not mlflow_errors.lost_server(ValueError("bad parameter"))
