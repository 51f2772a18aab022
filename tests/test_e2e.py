"""End to end: `mlflow run . -e main --env-manager local` on a tiny real-image set, checked through the client.

Every stage runs as its own process, exactly as a user or CI runs it, against a temporary SQLite store.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import bench_pipeline
import mlflow
import pytest

from conftest import SCRATCH_SETS
from helpers import PROJECT_DIR, assert_store_consistent, mlflow_run, mlflow_run_command, mlflow_runs_at_once
from steps import contract
from steps.tracking import create_sqlite_store

pytestmark = pytest.mark.e2e


def run_main(tiny_data: Path, store: str, tmp_path: Path, threshold: str, seed: str) -> dict[str, str]:
    """main through `mlflow run`, timed and read back by the benchmark's pipeline half, whose every
    figure must be there; the main run's tags."""
    output = tmp_path / f"predictions-{threshold}-{seed}.csv"
    params = {
        "data_dir": str(tiny_data),
        "epochs": "1",
        "image_size": "32",
        "hparams": SCRATCH_SETS,
        "threshold": threshold,
        "seed": seed,
        "output": str(output),
    }
    result = bench_pipeline.run(params, store, experiment="e2e")
    assert result["status"] == "FINISHED"
    text = bench_pipeline.report(result, params)
    assert "nan" not in text, text
    for figure in ("wall time", "accuracy |", "balanced accuracy", "precision / recall / F1", "ROC-AUC", "best set"):
        assert figure in text
    return {**result["tags"], "output": str(output)}


def kill_training(tiny_data: Path, store: str) -> tuple[int, str]:
    """A training in train/e2e that SIGKILLs itself as its first epoch ends; its exit code and stderr.

    SIGKILL is the out-of-memory killer, which no process can answer: its runs stay RUNNING. The
    moment is an event (``tests/signal_at.py``), not a sleep. SIGTERM is tests/test_signals.py's.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, str(PROJECT_DIR / "tests" / "signal_at.py"), "SIGKILL",
           "steps.train:EpochLogger.on_epoch_end", "raise", "--", "--data_dir", str(tiny_data),
           "--hparams", "small", "--epochs", "3", "--image_size", "32", "--experiment", "e2e"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return done.returncode, done.stderr


def test_main_trains_evaluates_registers_promotes_and_infers(tiny_data, store, tmp_path):
    client = mlflow.MlflowClient()

    # A training killed mid-way with SIGKILL cannot close its runs: they stay RUNNING until the next stage.
    code, stderr = kill_training(tiny_data, store)
    assert code == -signal.SIGKILL, stderr[-3000:]
    train_experiment = client.get_experiment_by_name("train/e2e").experiment_id
    dead = {r.info.run_id: r.info.status for r in client.search_runs([train_experiment])}
    assert sorted(dead.values()) == ["RUNNING", "RUNNING"]

    # Two mains at once on one store: this one, and a twin in experiment e2e-twin (one set, another
    # seed) registering into the same Production_Reg. Both must be recorded; prod ends on the better.
    twin_params = {"data_dir": str(tiny_data), "epochs": "1", "image_size": "32", "hparams": "small", "seed": "7",
                   "threshold": "0.0", "output": str(tmp_path / "twin.csv"), "experiment": "e2e-twin"}  # fmt: skip
    cmd, env = mlflow_run_command("main", twin_params, store, "pipeline/e2e-twin")
    twin = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run_main(tiny_data, store, tmp_path, threshold="0.0", seed="42")
    twin_out, twin_err = twin.communicate(timeout=900)
    assert twin.returncode == 0, twin_err[-5000:]
    twin_run = client.search_runs([client.get_experiment_by_name("pipeline/e2e-twin").experiment_id])[0]
    assert twin_run.info.status == "FINISHED" and twin_run.data.tags[contract.TAG_REGISTERED_MODEL] == "Production_Reg"
    both = client.search_model_versions("name = 'Production_Reg'")
    assert sorted(str(v.version) for v in both) == ["1", "2"]
    best_acc = max(float(v.tags["acc"]) for v in both)
    best_version = min(int(v.version) for v in both if float(v.tags["acc"]) == best_acc)  # ties: the earlier
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == str(best_version)

    # The next main ran cleanly, and its train stage closed the SIGKILLed runs, saying why.
    for run_id in dead:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "is no longer running" in run.data.tags[contract.TAG_REAPED]
    assert first[contract.TAG_BEST_RUN_ID] not in dead

    # Three nested train runs under the train parent, and best_run_id names the best of them.
    train_run = client.get_run(first[contract.TAG_TRAIN_RUN_ID])
    assert client.get_experiment(train_run.info.experiment_id).name == "train/e2e"
    children = client.search_runs(
        [train_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{train_run.info.run_id}'"
    )
    assert len(children) == 3
    best = max(children, key=lambda c: (c.data.metrics["best_val_accuracy"], -c.data.metrics["best_val_loss"]))
    assert train_run.data.tags[contract.TAG_BEST_RUN_ID] == best.info.run_id == first[contract.TAG_BEST_RUN_ID]

    # The evaluated model lands in Production_Reg with acc equal to the eval run's test accuracy.
    eval_run = client.get_run(first[contract.TAG_EVAL_RUN_ID])
    assert client.get_experiment(eval_run.info.experiment_id).name == "eval/e2e"
    assert eval_run.data.tags[contract.TAG_SOURCE_RUN_ID] == best.info.run_id
    assert first[contract.TAG_REGISTERED_MODEL] == "Production_Reg"
    version = client.get_model_version("Production_Reg", first[contract.TAG_REGISTERED_VERSION])
    assert float(version.tags["acc"]) == eval_run.data.metrics["test_accuracy"]

    # Infer ran with prod and wrote one row per test image.
    infer_run = client.get_run(first[contract.TAG_INFER_RUN_ID])
    assert client.get_experiment(infer_run.info.experiment_id).name == "infer/e2e"
    n_test = len(list((tiny_data / "test").rglob("*.png")))
    rows = list(csv.DictReader(open(first["output"])))
    assert len(rows) == n_test == infer_run.data.metrics["n_images"]
    # prod when it ran: its own version, or the twin's if that had taken prod by then.
    assert infer_run.data.tags[contract.TAG_MODEL_VERSION] in ("1", "2")

    # Two evaluations at once, through mlflow run: a second model (another set of the same train run)
    # over the bar, and the first train run again under a bar no model can pass (1.0, the highest
    # legal threshold). prod ends on the highest-acc production version; the other goes to
    # Testing_Reg and never touches prod.
    other_set = next(c for c in children if c.info.run_id != best.info.run_id)
    data = {"data_dir": str(tiny_data), "experiment": "e2e"}
    second = {"run_id": other_set.info.run_id, "threshold": "0.0", **data}
    below = {"run_id": first[contract.TAG_TRAIN_RUN_ID], "threshold": "1.0", **data}
    for done in mlflow_runs_at_once(("evaluate", second, store, "eval/e2e"), ("evaluate", below, store, "eval/e2e")):
        assert done.returncode == 0, done.stderr[-5000:]
    versions = client.search_model_versions("name = 'Production_Reg'")
    assert len(versions) == 3
    prod = client.get_model_version_by_alias("Production_Reg", "prod")
    assert float(prod.tags["acc"]) == max(float(v.tags["acc"]) for v in versions)
    testing = client.search_model_versions("name = 'Testing_Reg'", order_by=["version_number DESC"])[0]
    assert float(testing.tags["acc"]) < 1.0
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == str(prod.version)
    assert client.get_run(testing.tags["eval_run_id"]).data.tags[contract.TAG_PROMOTED] == "false"

    # prod moved by hand to the other version, through mlflow run; the history shows every move.
    other = next(str(v.version) for v in versions if str(v.version) != str(prod.version))
    reason = "line 2 reports missed cracks"  # spaces survive mlflow run's command line
    done = mlflow_run("promote", {"version": other, "reason": reason, "experiment": "e2e"}, store, "promote/e2e")
    assert done.returncode == 0, done.stderr[-5000:]
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == other
    shown = subprocess.run(
        [sys.executable, "-m", "steps.promote", "history"], capture_output=True, text=True, cwd=PROJECT_DIR, check=True
    ).stdout.splitlines()
    moves = [line.split()[1:4] for line in shown[1:]]
    assert moves[-1] == [str(prod.version), "->", other] and reason in shown[-1] and "promote" in shown[-1]
    assert moves[0][:2] == ["-", "->"] and moves[0][2] in ("1", "2")  # whichever main settled first
    # Nothing the killed trainings did reached the registry; nothing is left half done.
    sources = {v.tags["source_run_id"] for v in client.search_model_versions("")}
    assert sources and sources.isdisjoint(dead)
    assert_store_consistent(client)


BAD_INPUT = [
    ("train", {"epochs": "abc"}, "error: parameter epochs (train.epochs): expected an integer, got 'abc'"),
    (
        "evaluate",
        {"run_id": "x", "threshold": "1.01"},
        "error: parameter threshold (evaluate.threshold): expected a number in [0, 1], got 1.01",
    ),
    (
        "infer",
        {},
        "error: no model at models:/Production_Reg@prod: no version of 'Production_Reg' has the alias 'prod' yet",
    ),
]


def test_bad_input_through_mlflow_run_fails_with_one_clear_line(store, tiny_data):
    """A sample per entry point through `mlflow run` itself, run at once; every case is covered
    in-process in tests/test_robustness.py."""
    # Created first, as `make run` does: several bare `mlflow run`s on a store that does not exist
    # yet race to create its tables inside MLflow's own command, before any pipeline code runs.
    create_sqlite_store(store)
    runs = []
    for entry_point, params, _ in BAD_INPUT:
        data = {"data_dir": str(tiny_data)} if entry_point != "infer" else {"input": str(tiny_data / "test")}
        runs.append((entry_point, {**data, **params}, store, None))
    for (entry_point, _, message), done in zip(BAD_INPUT, mlflow_runs_at_once(*runs), strict=True):
        assert done.returncode != 0, entry_point
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-3000:]
        assert "Traceback" not in done.stderr
