"""A store kept between CI runs (steps/mlflow_io/store.py): backups, the schema upgrade, the retention rule,
the part one run uploads (tests/e2e/test_ci_store.py runs the workflow's own store step)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest

from steps import promote
from steps.core import contract
from steps.core.errors import ModelError, PipelineError, StoreError
from steps.core.loader import load_config
from steps.mlflow_io import rule, store
from steps.mlflow_io.store import Held


def held(version: int, *aliases: str, name: str = "Production_Reg", location: str = "", pruned: bool = False) -> Held:
    return Held(name, version, aliases, location or f"file:///store/{name}/{version}", pruned)


# --- The retention rule ------------------------------------------------------------------


@pytest.mark.unit
def test_retention_keeps_the_alias_holder_and_the_last_n_of_each_registered_model():
    versions = [held(v) for v in range(1, 7)] + [held(3, name="Testing_Reg"), held(4, name="Testing_Reg")]
    versions[1] = held(2, "prod")
    going = store.to_prune(versions, keep_last=2)
    assert sorted((v.name, v.version) for v in going) == [("Production_Reg", 1), ("Production_Reg", 3),
                                                          ("Production_Reg", 4)]  # fmt: skip


@pytest.mark.unit
def test_retention_never_prunes_files_a_kept_version_shares_nor_a_version_pruned_already():
    shared = "file:///store/models/m-1"
    versions = [held(1, location=shared), held(2, pruned=True), held(3), held(4, location=shared)]
    assert store.to_prune(versions, keep_last=1) == [held(3)]


@pytest.mark.unit
def test_the_rule_never_gives_prod_to_a_pruned_version():
    pruned = rule.Scored("3", 0.99, pruned=True)
    holder = rule.Scored("1", 0.80)
    assert rule.decide("1", [holder, pruned], 0.0) == ("1", "version 1 (acc 0.8000) already holds prod")
    takes, why = rule.judge(pruned, holder, 0.0)
    assert not takes and "pruned by the store's retention rule" in why


@pytest.mark.unit
@pytest.mark.parametrize("key, value", [("store.keep_versions", "0"), ("store.keep_backups", "-1"),
                                        ("store.keep_versions", "many")])  # fmt: skip
def test_bad_retention_settings_fail_with_a_clear_error(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config({key: value})


# --- Backups and the schema --------------------------------------------------------------


@pytest.mark.unit
def test_a_backup_is_a_consistent_copy_and_only_the_newest_are_kept(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("create table t (x)")
        con.execute("insert into t values (42)")
    con.close()
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    copies = [store.backup(db, keep=2, now=start + timedelta(minutes=i)) for i in range(4)]
    assert sorted((tmp_path / "backups").iterdir()) == copies[2:]
    with sqlite3.connect(copies[-1]) as con:
        assert con.execute("select x from t").fetchall() == [(42,)]
    con.close()
    assert store.backup(tmp_path / "none.db", keep=2) is None


def older_schema(db: Path) -> str:
    """A store made by ``prepare``, its schema one migration behind this MLflow's, as an older MLflow left it."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config

    uri = store.store_uri(db.parent)
    store.create(uri, [])
    command.downgrade(_get_alembic_config(uri), "-1")
    return uri


def schema_problem(db: Path) -> str | None:
    """MLflow's own check of a database's schema: None when it is this MLflow's."""
    import sqlalchemy
    from mlflow.store.db.utils import _verify_schema

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    try:
        _verify_schema(engine)
        return None
    except mlflow.exceptions.MlflowException as err:
        return err.message
    finally:
        engine.dispose()


@pytest.mark.unit
@pytest.mark.slow  # mlflow db upgrade, in a process of its own
def test_prepare_backs_up_and_upgrades_a_store_an_older_mlflow_left(tmp_path, capsys):
    folder = tmp_path / "ci-stores" / "acme" / "defects"
    folder.mkdir(parents=True)
    uri = older_schema(folder / "mlflow.db")
    assert "out-of-date database schema" in schema_problem(folder / "mlflow.db")
    env = tmp_path / ".env"
    assert store.prepare(load_config(), str(folder), str(env)) == uri
    assert env.read_text() == f"MLFLOW_TRACKING_URI={uri}\n"
    assert schema_problem(folder / "mlflow.db") is None
    (saved,) = (folder / "backups").glob("mlflow-*.db")
    assert "out-of-date database schema" in schema_problem(saved)  # the copy is the store as it was
    client = mlflow.MlflowClient(uri)
    names = {e.name: e.artifact_location for e in client.search_experiments()}
    assert set(names) == {"Default", "pipeline/defect-detection"}
    assert all(Path(unquote(urlparse(loc).path)).is_relative_to(folder / "mlruns") for loc in names.values())
    assert "backed up and upgraded" in capsys.readouterr().out


@pytest.mark.unit
@pytest.mark.slow
def test_an_upgrade_that_fails_says_so_and_names_the_backup(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database")
    with pytest.raises(StoreError, match=r"mlflow db upgrade failed on .*mlflow\.db: .*; the copy made before it is"):
        store.upgrade(f"sqlite:///{db}", tmp_path / "backups" / "x.db")


@pytest.mark.unit
def test_prepare_without_a_folder_fails_with_a_clear_error():
    with pytest.raises(PipelineError, match="parameter dir: the folder the store lives in is required"):
        store.prepare(load_config(), "")


# --- Pruning a real store ----------------------------------------------------------------


class Tiny(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def train_like(experiment_id: str, sets: int) -> list[str]:
    """A train run with ``sets`` nested set runs, each with a logged model and an exports/ folder, as
    train logs them; the set runs' IDs."""
    ids = []
    with mlflow.start_run(experiment_id=experiment_id):
        for _ in range(sets):
            with mlflow.start_run(experiment_id=experiment_id, nested=True) as child:
                mlflow.log_text("onnx bytes", f"{contract.EXPORTS_ARTIFACT}/model.onnx")
                mlflow.log_text("{}", "config.yaml")
                mlflow.pyfunc.log_model(name=contract.MODEL_ARTIFACT, python_model=Tiny(), pip_requirements=["mlflow"])
                ids.append(child.info.run_id)
    return ids


def files_of(client, run_id: str) -> tuple[Path, Path]:
    """A set run's artifact folder and its logged model's folder."""
    run = client.get_run(run_id)
    (model,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run_id}'")
    return Path(unquote(urlparse(run.info.artifact_uri).path)), Path(unquote(urlparse(model.artifact_location).path))


def store_with_a_train_experiment(folder: Path) -> tuple[mlflow.MlflowClient, str]:
    """A new store in ``folder``, made current, with an experiment ``train/t``: a client and its ID."""
    uri = store.store_uri(folder)
    store.create(uri, [])  # sets the tracking URI
    client = mlflow.MlflowClient(uri)
    return client, client.create_experiment("train/t", artifact_location=(folder / "mlruns" / "t").as_uri())


@pytest.mark.unit
def test_prune_deletes_old_versions_files_with_their_training_and_keeps_entries_scores_and_prod(tmp_path):
    folder = tmp_path / "store"
    client, experiment = store_with_a_train_experiment(folder)
    trainings = [train_like(experiment, sets=2) for _ in range(4)]
    for version, (best, _other) in enumerate(trainings, start=1):
        mv = mlflow.register_model(f"runs:/{best}/{contract.MODEL_ARTIFACT}", "Production_Reg")
        assert int(mv.version) == version
        client.set_model_version_tag("Production_Reg", mv.version, contract.VERSION_TAG_SOURCE_RUN_ID, best)
        client.set_model_version_tag("Production_Reg", mv.version, contract.VERSION_TAG_ACC, "0.9")
        client.set_model_version_tag("Production_Reg", mv.version, contract.VERSION_TAG_TEST_DIGEST, "abc")
    client.set_registered_model_alias("Production_Reg", "prod", "1")

    pruned = store.prune(client, ["Production_Reg", "Testing_Reg"], keep_last=2)

    assert [(p.name, p.version) for p in pruned] == [("Production_Reg", 2)]
    for version, training in enumerate(trainings, start=1):
        for run_id in training:
            run_dir, model_dir = files_of(client, run_id)
            gone = version == 2
            assert (run_dir / contract.EXPORTS_ARTIFACT).exists() is not gone, (version, run_id)
            assert model_dir.exists() is not gone, (version, run_id)
            assert (run_dir / "config.yaml").exists()  # the run's small records stay
    tags = client.get_model_version("Production_Reg", "2").tags
    assert tags[contract.VERSION_TAG_ACC] == "0.9" and contract.VERSION_TAG_PRUNED in tags
    assert store.prune(client, ["Production_Reg", "Testing_Reg"], keep_last=2) == []  # once is enough
    with pytest.raises(ModelError, match="version 2's files were pruned by the store's retention rule"):
        promote.check_promotable(client, load_config(), "2")


@pytest.mark.unit
def test_collect_copies_the_database_and_only_the_runs_started_since(tmp_path):
    folder = tmp_path / "store"
    client, experiment = store_with_a_train_experiment(folder)
    (old,) = train_like(experiment, sets=1)
    since = client.get_run(old).info.end_time + 1
    (new,) = train_like(experiment, sets=1)
    out = tmp_path / "upload"
    store.collect(load_config(), str(folder), str(since), str(out))
    assert (out / "mlflow.db").is_file()
    for run_id, wanted in ((old, False), (new, True)):
        run_dir, model_dir = files_of(client, run_id)
        assert (out / run_dir.relative_to(folder) / contract.EXPORTS_ARTIFACT / "model.onnx").exists() is wanted
        assert (out / model_dir.relative_to(folder) / "MLmodel").exists() is wanted
