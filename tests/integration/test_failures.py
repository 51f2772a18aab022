"""A clear outcome for every failure, and prod never left where it must not be: each failure kind has
one line, its own exit code and a run tag; two promotes at once, an unreadable champion, a split
without every class, a cache that lies, a huge file, and the small ones (a -P value starting with
-, Ctrl-C, TensorFlow's start-up notes, a password with an @).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import mlflow
import numpy as np
import pytest

from conftest import world_config
from helpers import PROJECT_DIR, make_tiny_elpv, mlflow_run_command, use_copy_of, wait_for_epochs
from steps import evaluate, infer, promote, train
from steps.core import cli, contract, errors
from steps.core.errors import redact
from steps.core.loader import load_config
from steps.datasets import data
from steps.datasets.data import DataError
from steps.inference import local, outputs
from steps.mlflow_io import registry
from steps.mlflow_io.registration import register_and_promote
from steps.mlflow_io.registry import alias_version
from steps.served import serving

CONFIG = load_config({"experiment": "test"})
REG = CONFIG.registry
D1 = "aaaaaaaaaaaaaaaa"


# --- Kinds and codes ---------------------------------------------------------------------------


@pytest.mark.unit
def test_every_failure_kind_has_its_own_code_and_the_readme_lists_each():
    codes = [f.exit_code for f in errors.FAILURES]
    assert len(set(codes)) == len(codes) and 0 not in codes
    readme = (PROJECT_DIR / "README.md").read_text() + (PROJECT_DIR / "docs" / "failures.md").read_text()
    for failure in errors.FAILURES:
        assert re.search(rf"\| `{failure.kind}` \| {failure.exit_code}\b", readme), failure.kind


@pytest.mark.unit
def test_a_bug_keeps_its_traceback_and_exits_70_not_1(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def broken(config):
        return {}["missing"]

    with pytest.raises(SystemExit) as stop:
        cli.main(broken, "", {}, argv=[])
    err = capsys.readouterr().err
    assert stop.value.code == errors.BUG.exit_code == 70
    assert "Traceback" in err and err.strip().endswith("error: an unexpected KeyError (a bug: the traceback is above)")


@pytest.mark.model
def test_a_full_disk_exits_5_in_one_line_keeps_the_old_predictions_and_tags_the_run(
    prod_world, tmp_path, monkeypatch, capsys
):
    db, _ = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    output = tmp_path / "predictions.csv"
    output.write_text("the previous predictions\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", full)
    argv = [f"--input={db.parent / 'data' / 'test'}", f"--output={output}", "--experiment=robust", "--gradcam_top=0"]
    with pytest.raises(SystemExit) as stop:
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == errors.OUTPUT.exit_code == 5
    assert err == f"error: cannot write {output}: No space left on device; the previous file is unchanged"
    assert output.read_text() == "the previous predictions\n"
    assert not list(tmp_path.glob(".predictions.csv.*.part"))
    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("infer/robust").experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert (run.info.status, run.data.tags[contract.TAG_FAILURE_KIND]) == ("FAILED", "output")


@pytest.mark.model
@pytest.mark.slow  # logs a Keras model of its own
def test_a_plain_keras_model_is_refused_in_one_line_with_exit_3(prod_world, tmp_path, monkeypatch, capsys):
    import keras

    db, _ = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    network = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with mlflow.start_run(experiment_id=mlflow.MlflowClient().create_experiment("someone's keras")) as run:
        mlflow.keras.log_model(network, name="model", pip_requirements=[])
    argv = [f"--input={db.parent / 'data' / 'test'}", f"--model_uri=runs:/{run.info.run_id}/model",
            f"--output={tmp_path / 'p.csv'}", "--experiment=robust"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == errors.MODEL.exit_code == 3
    assert err.startswith(f"error: cannot load runs:/{run.info.run_id}/model: it is not a model train logged (")
    assert "\n" not in err and "KeyError" not in err


@pytest.mark.slow
def test_a_store_locked_by_another_writer_fails_promote_in_one_line_with_exit_4(store, tmp_path, capsys):
    path = store.removeprefix("sqlite:///")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main(
                promote.promote, "", promote.OVERRIDES, argv=["--version=1", "--reason=r"], own=("version", "reason")
            )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == errors.STORE.exit_code == 4
    assert err.startswith(f"error: the store {store} stayed locked by another process's write (database is locked)")
    assert "\n" not in err


# --- prod's integrity ------------------------------------------------------------------------


def register(acc: float):
    return register_and_promote(mlflow.MlflowClient(), CONFIG, "file:///nowhere", acc, D1, {})


@pytest.mark.unit
@pytest.mark.usefixtures("unchecked_files")
def test_two_promotes_at_once_never_leave_prod_on_a_blocked_version(store, capsys):
    """B promotes v3; A, a rollback to v1 that blocks v2 and v3, runs start to finish between B's
    checks and its move. B's move comes last: prod ends on v3, and v3 is not blocked."""
    v1, v2, v3 = (register(acc).version for acc in (0.70, 0.90, 0.80))
    assert alias_version(REG.production, REG.alias) == v2
    real_move = registry.move_alias
    done = []

    def a_runs_first(client, reg, to, came_from, action, *args):
        if action == "promote" and to == v3 and not done:
            # Another process: a thread of its own, as MLflow's active run is per thread.
            other = threading.Thread(target=lambda: done.append(promote.promote(CONFIG, v1, "A: roll back to v1")))
            other.start()
            other.join()
        return real_move(client, reg, to, came_from, action, *args)

    registry.move_alias = a_runs_first
    try:
        promote.promote(CONFIG, v3, "B: v3 by hand")
    finally:
        registry.move_alias = real_move
    client = mlflow.MlflowClient()
    assert done and alias_version(REG.production, REG.alias) == v3
    assert contract.VERSION_TAG_BLOCKED not in client.get_model_version(REG.production, v3).tags
    weaker = register(0.60)  # the next evaluation must not take prod from a "blocked" holder
    assert not weaker.promoted and alias_version(REG.production, REG.alias) == v3


@pytest.mark.model
@pytest.mark.slow  # decodes a test set and loads the model
def test_a_champion_whose_files_cannot_be_read_keeps_prod_and_fails_naming_the_way_out(
    prod_world, tmp_path, monkeypatch, capsys
):
    db, train_run = prod_world
    uri = use_copy_of(db, tmp_path, monkeypatch)
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as conn:  # its files moved away
        conn.execute(
            "UPDATE model_versions SET storage_location = ? WHERE version = 1", ((tmp_path / "gone").as_uri(),)
        )
    new_test = tmp_path / "data"  # a new test set (one image fewer), so that the champion is re-scored
    for path in sorted((db.parent / "data" / "test").rglob("*.png"))[1:]:
        target = new_test / path.relative_to(db.parent / "data")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    argv = [f"--run_id={train_run}", f"--data_dir={new_test}", "--threshold=0.0", "--experiment=robust"]
    with pytest.raises(SystemExit) as stop:
        cli.main(evaluate.evaluate, "", evaluate.OVERRIDES, argv=argv, own=("run_id",))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == errors.MODEL.exit_code
    assert err.startswith("error: cannot read prod version 1 to score it on this test set (")
    assert err.endswith("move prod to another version: mlflow run . -e promote -P version=<N> -P reason=...")
    assert alias_version("Production_Reg", "prod") == "1"


# --- Data before any work --------------------------------------------------------------------


@pytest.mark.data
def test_one_image_per_class_is_refused_before_any_work(tmp_path, store):
    data_dir = make_tiny_elpv(tmp_path / "data", per_class={"train": 1, "test": 1})
    config = world_config(data_dir, tmp_path)
    with pytest.raises(DataError) as err:
        train.train(config)
    assert str(err.value).startswith(
        "validation has no 'ok_front', validation has no 'def_front' (training ok_front 1, def_front 1; "
        "validation ok_front 0, def_front 0): every class must be in each; add images to"
    )
    assert mlflow.get_experiment_by_name("train/robust") is None  # no run, nothing trained


@pytest.mark.data
@pytest.mark.parametrize("lie", ["fewer rows", "7x7 images", "forged failures"])
def test_a_cache_entry_that_does_not_fit_its_key_is_decoded_again(tiny_data, tmp_path, monkeypatch, lie):
    monkeypatch.setenv("DEFECT_CACHE_DIR", str(tmp_path / "cache"))
    paths = sorted((tiny_data / "train").rglob("*.png"))[:6]
    truth, none_failed = data.load_images(paths, 32, cache=True)
    truth = np.array(truth)  # a copy: the mapped file is overwritten next
    (entry,) = (tmp_path / "cache").glob("*.npy")
    forged = {
        "fewer rows": (truth[:4], {}),
        "7x7 images": (np.zeros((6, 7, 7, 1), np.float32), {}),
        "forged failures": (truth, {2: "corrupt or truncated image data (a forged reason)"}),
    }[lie]
    np.save(entry, forged[0])
    entry.with_suffix(".json").write_text(json.dumps(forged[1]))
    images, failures = data.load_images(paths, 32, cache=True)
    assert failures == none_failed == {} and np.array_equal(images, truth)
    again, _ = data.load_images(paths, 32, cache=True)  # the entry was replaced by the true one
    assert np.array_equal(again, truth)
    assert np.load(entry, mmap_mode="r").shape == truth.shape


@pytest.mark.data
def test_infer_checks_a_files_size_before_reading_it(tmp_path):
    sparse = tmp_path / "input" / "huge.tif"
    sparse.parent.mkdir()
    with open(sparse, "wb") as handle:
        handle.truncate(2 * 2**30)  # 2 GB on disk's word, nothing written
    with pytest.raises(serving.ImageError, match=r"^2,147,483,648 bytes, more than the limit of 268,435,456 "):
        local.read_inside(sparse, sparse.parent, 256 * 2**20)
    assert load_config({"infer.max_file_mb": "256"}).infer.max_file_mb == 256
    with pytest.raises(Exception, match="infer.max_file_mb: expected an integer >= 1"):
        load_config({"infer.max_file_mb": "0"})


# --- The small ones ------------------------------------------------------------------------


@pytest.mark.unit
def test_a_parameter_value_that_starts_with_a_dash_reaches_the_stage():
    """As `mlflow run -P reason=-rollback` renders MLproject's command, then the stage parses it."""
    import shlex

    from mlflow.projects._project_spec import load_project

    entry = load_project(str(PROJECT_DIR)).get_entry_point("promote")
    command = entry.compute_command({"version": "2", "reason": "-rollback"}, storage_dir=None)
    _, own = cli.parse("", promote.OVERRIDES, shlex.split(command)[3:], own=("version", "reason"))
    assert own == {"version": "2", "reason": "-rollback"}


@pytest.mark.unit
def test_a_password_with_a_raw_at_sign_is_redacted_whole():
    assert redact("https://ci:p@ss@w0rd@mlflow.example.com/x and sqlite:///m.db") == (
        "https://***@mlflow.example.com/x and sqlite:///m.db"
    )
    assert redact("see http://host:5000/#/runs or mail a@b.c") == "see http://host:5000/#/runs or mail a@b.c"


@pytest.mark.unit
@pytest.mark.slow  # a Python of its own importing TensorFlow: 5 s
def test_importing_tensorflow_in_a_stage_prints_nothing():
    done = subprocess.run(
        [sys.executable, "-c", "import steps, tensorflow, keras"], cwd=PROJECT_DIR, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stderr == ""


@pytest.mark.unit
def test_the_readme_says_how_the_plain_mlflow_run_keeps_a_credential_out_of_its_output():
    readme = (PROJECT_DIR / "README.md").read_text() + (PROJECT_DIR / "docs" / "failures.md").read_text()
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true mlflow run . -e promote" in readme


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_on_main_ends_every_run_killed_and_says_sigint(tiny_data, tmp_path):
    """Ctrl-C on `mlflow run . -e main`: the terminal's SIGINT reaches the whole foreground group,
    then `mlflow run` cancels main with SIGTERM and, once main has exited, writes FAILED over its
    run (steps/mlflow_io/runs.py says why). main says SIGINT, and every run ends KILLED."""
    from helpers import empty_store

    store = empty_store(tmp_path / "mlflow.db")
    params = {"data_dir": str(tiny_data), "hparams": "small", "epochs": "30", "image_size": "32", "exports": "none",
              "experiment": "ctrlc", "output": str(tmp_path / "p.csv")}  # fmt: skip
    cmd, env = mlflow_run_command("main", params, store, experiment="pipeline/ctrlc")
    process = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    client = mlflow.MlflowClient(store)
    wait_for_epochs(client, "train/ctrlc", 1, process)
    os.killpg(process.pid, signal.SIGINT)  # what the terminal sends the foreground process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0, stderr[-3000:]
    assert "error: stopped by SIGINT; any run it had started is marked KILLED" in stderr
    (main_run,) = client.search_runs([client.get_experiment_by_name("pipeline/ctrlc").experiment_id])
    assert main_run.data.tags.get(contract.TAG_FAILURE_KIND) == "interrupted", stderr[-4000:]
    deadline = time.monotonic() + 60  # main's helper puts KILLED back once `mlflow run` has exited
    while client.get_run(main_run.info.run_id).info.status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_run(main_run.info.run_id).info.status == "KILLED"
    for name in ("train/ctrlc",):
        statuses = {r.info.status for r in client.search_runs([client.get_experiment_by_name(name).experiment_id])}
        assert statuses == {"KILLED"}, (name, statuses)
