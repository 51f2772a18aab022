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
from typing import NamedTuple

import mlflow
import pytest

from conftest import SCRATCH_SETS
from helpers import (
    PROJECT_DIR,
    assert_store_consistent,
    benchmark,
    empty_store,
    mlflow_run,
    mlflow_run_command,
    mlflow_runs_at_once,
)
from steps.core import contract

bench_pipeline = benchmark("bench_pipeline")
pytestmark = pytest.mark.e2e


def run_main(tiny_data: Path, store: str, tmp_path: Path, threshold: str, seed: str) -> tuple[dict[str, str], str]:
    """main through `mlflow run`, timed and read back by the benchmark's pipeline half; the main run's
    tags (and "output") and the benchmark's report."""
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
    return {**result["tags"], "output": str(output)}, bench_pipeline.report(result, params)


def kill_training(tiny_data: Path, store: str) -> tuple[int, str]:
    """A training in train/e2e that SIGKILLs itself as its first epoch ends; its exit code and stderr.

    SIGKILL is the out-of-memory killer, which no process can answer: its runs stay RUNNING. The
    moment is an event (``tests/signal_at.py``), not a sleep. SIGTERM is tests/e2e/test_signals.py's.
    """
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    cmd = [sys.executable, str(PROJECT_DIR / "tests" / "signal_at.py"), "SIGKILL",
           "steps.network.training:EpochLogger.on_epoch_end", "raise", "--", "--data_dir", str(tiny_data),
           "--hparams", "small", "--epochs", "3", "--image_size", "32", "--experiment", "e2e"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=PROJECT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return done.returncode, done.stderr


class Killed(NamedTuple):
    """The SIGKILLed training: its exit code, stderr, and its runs' statuses right after."""

    code: int
    stderr: str
    statuses: dict[str, str]


class Registry(NamedTuple):
    """Production_Reg at a moment: its versions and the version holding prod."""

    versions: list
    prod: str


class Promoted(NamedTuple):
    """promote by hand through mlflow run: its result, the version chosen and the reason given."""

    result: subprocess.CompletedProcess
    version: str
    reason: str


class Again(NamedTuple):
    """main once more with nothing changed: its run's tags, and the registry before it ran."""

    tags: dict[str, str]
    versions_before: list
    prod_before: str


class Scenario(NamedTuple):
    """What the shared pipeline run saw, phase by phase: each test below checks one part of it."""

    store: str
    killed: Killed
    first: dict[str, str]  # main's run tags, and "output"
    report: str  # the pipeline benchmark's report of that main
    twin: subprocess.CompletedProcess  # the twin main, started beside it
    after_mains: Registry  # once both mains ended
    evaluations: list[subprocess.CompletedProcess]  # the two evaluations at once
    after_evaluations: Registry
    promoted: Promoted
    history: list[str]  # `python -m steps.promote history`, line by line
    again: Again


@pytest.fixture(scope="module")
def scenario(tiny_data, tmp_path_factory) -> Scenario:
    """One store through every phase, in order: a training SIGKILLed mid-way; two mains at once (this
    one timed by the pipeline benchmark, and a twin in experiment e2e-twin, one set, another seed,
    registering into the same Production_Reg); two evaluations at once through `mlflow run`; prod
    moved by hand with `promote`; the first main again, nothing changed. Each phase runs as users
    run it, as its own processes."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    # Made before anything runs, as `make run` does: bare `mlflow run`s starting together on a store
    # that does not exist yet race to create its tables inside MLflow's own command.
    store = empty_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(store)

    # The twin starts first: its stages work in the e2e-twin experiments, where nothing is killed.
    twin_params = {"data_dir": str(tiny_data), "epochs": "1", "image_size": "32", "hparams": "small", "seed": "7",
                   "exports": "none",
                   "threshold": "0.0", "output": str(tmp_path / "twin.csv"), "experiment": "e2e-twin"}  # fmt: skip
    cmd, env = mlflow_run_command("main", twin_params, store, "pipeline/e2e-twin")
    twin = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    code, stderr = kill_training(tiny_data, store)
    train_experiment = client.get_experiment_by_name("train/e2e")
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([train_experiment.experiment_id])}

    first, report = run_main(tiny_data, store, tmp_path, threshold="0.0", seed="42")
    twin_out, twin_err = twin.communicate(timeout=900)
    twin_done = subprocess.CompletedProcess(cmd, twin.returncode, twin_out, twin_err)
    after_mains = Registry(
        client.search_model_versions("name = 'Production_Reg'"),
        str(client.get_model_version_by_alias("Production_Reg", "prod").version),
    )

    # Two evaluations at once: a second model (another set of the same train run) over the bar, and
    # the first train run again under a bar no model can pass (1.0, the highest legal threshold).
    train_run = client.get_run(first[contract.TAG_TRAIN_RUN_ID])
    other_set = next(c for c in children_of(client, train_run) if c.info.run_id != first[contract.TAG_BEST_RUN_ID])
    data = {"data_dir": str(tiny_data), "experiment": "e2e"}
    second = {"run_id": other_set.info.run_id, "threshold": "0.0", **data}
    below = {"run_id": first[contract.TAG_TRAIN_RUN_ID], "threshold": "1.0", **data}
    evaluations = mlflow_runs_at_once(("evaluate", second, store, "eval/e2e"), ("evaluate", below, store, "eval/e2e"))

    versions = client.search_model_versions("name = 'Production_Reg'")
    prod = str(client.get_model_version_by_alias("Production_Reg", "prod").version)

    # prod moved by hand to a version that does not hold it, through mlflow run.
    other = next(str(v.version) for v in versions if str(v.version) != prod)
    reason = "line 2 reports missed cracks"  # spaces survive mlflow run's command line
    promoted = mlflow_run("promote", {"version": other, "reason": reason, "experiment": "e2e"}, store, "promote/e2e")
    shown = subprocess.run(
        [sys.executable, "-m", "steps.promote", "history"],
        capture_output=True, text=True, cwd=PROJECT_DIR, env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )  # fmt: skip
    # main once more with nothing changed: train and evaluate are reused, only infer runs.
    prod_before = str(client.get_model_version_by_alias("Production_Reg", "prod").version)
    before = (client.search_model_versions(""), prod_before)
    again, _ = run_main(tiny_data, store, tmp_path, threshold="0.0", seed="42")
    return Scenario(
        store=store,
        killed=Killed(code, stderr, statuses),
        first=first,
        report=report,
        twin=twin_done,
        after_mains=after_mains,
        evaluations=evaluations,
        after_evaluations=Registry(versions, prod),
        promoted=Promoted(promoted, other, reason),
        history=shown.stdout.splitlines() if shown.returncode == 0 else [shown.stderr],
        again=Again(again, *before),
    )


def children_of(client, train_run) -> list:
    return client.search_runs([train_run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{train_run.info.run_id}'")


@pytest.fixture
def client(scenario):
    return mlflow.MlflowClient(scenario.store)


def test_a_sigkilled_training_leaves_its_runs_running(scenario):
    """SIGKILL is the out-of-memory killer, which no process can answer: its runs stay RUNNING."""
    code, stderr, statuses = scenario.killed
    assert code == -signal.SIGKILL, stderr[-3000:]
    assert sorted(statuses.values()) == ["RUNNING", "RUNNING"]


def test_the_next_training_closes_the_killed_runs_saying_why(scenario, client):
    for run_id in scenario.killed.statuses:
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and "is no longer running" in run.data.tags[contract.TAG_REAPED]
    assert scenario.first[contract.TAG_BEST_RUN_ID] not in scenario.killed.statuses


def test_main_is_timed_by_the_pipeline_benchmark_with_every_figure(scenario):
    assert "nan" not in scenario.report, scenario.report
    figures = (
        "wall time",
        "accuracy |",
        "balanced accuracy",
        "precision / recall / F1",
        "ROC-AUC",
        "best set",
        "of which the exports",
    )
    for figure in figures:
        assert figure in scenario.report


def test_two_mains_at_once_both_finish_and_prod_ends_on_the_better(scenario, client):
    assert scenario.twin.returncode == 0, scenario.twin.stderr[-5000:]
    twin_run = client.search_runs([client.get_experiment_by_name("pipeline/e2e-twin").experiment_id])[0]
    assert twin_run.info.status == "FINISHED" and twin_run.data.tags[contract.TAG_REGISTERED_MODEL] == "Production_Reg"
    both, prod = scenario.after_mains
    assert sorted(str(v.version) for v in both) == ["1", "2"]
    best_acc = max(float(v.tags["acc"]) for v in both)
    assert prod == str(min(int(v.version) for v in both if float(v.tags["acc"]) == best_acc))  # ties: the earlier


def test_train_logs_three_nested_runs_and_tags_the_best(scenario, client):
    train_run = client.get_run(scenario.first[contract.TAG_TRAIN_RUN_ID])
    assert client.get_experiment(train_run.info.experiment_id).name == "train/e2e"
    children = children_of(client, train_run)
    assert len(children) == 3
    best = max(children, key=lambda c: (c.data.metrics["best_val_accuracy"], -c.data.metrics["best_val_loss"]))
    assert train_run.data.tags[contract.TAG_BEST_RUN_ID] == best.info.run_id == scenario.first[contract.TAG_BEST_RUN_ID]


def test_evaluate_registers_the_best_model_with_its_test_accuracy(scenario, client):
    eval_run = client.get_run(scenario.first[contract.TAG_EVAL_RUN_ID])
    assert client.get_experiment(eval_run.info.experiment_id).name == "eval/e2e"
    assert eval_run.data.tags[contract.TAG_SOURCE_RUN_ID] == scenario.first[contract.TAG_BEST_RUN_ID]
    assert scenario.first[contract.TAG_REGISTERED_MODEL] == "Production_Reg"
    version = client.get_model_version("Production_Reg", scenario.first[contract.TAG_REGISTERED_VERSION])
    assert float(version.tags["acc"]) == eval_run.data.metrics["test_accuracy"]


def test_infer_scores_every_test_image_with_prod(scenario, client, tiny_data):
    infer_run = client.get_run(scenario.first[contract.TAG_INFER_RUN_ID])
    assert client.get_experiment(infer_run.info.experiment_id).name == "infer/e2e"
    n_test = len(list((tiny_data / "test").rglob("*.png")))
    rows = list(csv.DictReader(open(scenario.first["output"])))
    assert len(rows) == n_test == infer_run.data.metrics["n_images"]
    # prod when it ran: its own version, or the twin's if that had taken prod by then.
    assert infer_run.data.tags[contract.TAG_MODEL_VERSION] in ("1", "2")


def test_two_evaluations_at_once_leave_prod_on_the_highest_acc(scenario, client):
    """The one over the bar may take prod; the one under it goes to Testing_Reg and never touches prod."""
    for done in scenario.evaluations:
        assert done.returncode == 0, done.stderr[-5000:]
    versions, prod = scenario.after_evaluations
    assert len(versions) == 3
    assert float(next(v for v in versions if str(v.version) == prod).tags["acc"]) == max(
        float(v.tags["acc"]) for v in versions
    )
    testing = client.search_model_versions("name = 'Testing_Reg'", order_by=["version_number DESC"])[0]
    assert float(testing.tags["acc"]) < 1.0
    assert client.get_run(testing.tags["eval_run_id"]).data.tags[contract.TAG_PROMOTED] == "false"


def test_promote_moves_prod_by_hand_and_history_shows_every_move(scenario, client):
    done, version, reason = scenario.promoted
    assert done.returncode == 0, done.stderr[-5000:]
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == version
    moves = [line.split()[1:4] for line in scenario.history[1:]]
    assert moves[-1][1:] == ["->", version] and reason in scenario.history[-1] and "promote" in scenario.history[-1]
    assert moves[0][:2] == ["-", "->"] and moves[0][2] in ("1", "2")  # whichever main settled first


def test_main_again_with_nothing_changed_reuses_train_and_evaluate(scenario, client):
    """How much time that saves is a benchmark's figure (BENCHMARKS.md), not a timed assertion here."""
    again, versions_before, prod_before = scenario.again
    for key in (contract.TAG_TRAIN_RUN_ID, contract.TAG_EVAL_RUN_ID, contract.TAG_REGISTERED_VERSION):
        assert again[key] == scenario.first[key], key
    assert contract.reused_from_tag(contract.STAGE_TRAIN) in again
    assert contract.reused_from_tag(contract.STAGE_EVAL) in again
    assert len(client.search_model_versions("")) == len(versions_before)  # nothing registered
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == prod_before
    assert again[contract.TAG_INFER_RUN_ID] != scenario.first[contract.TAG_INFER_RUN_ID]  # new input, new scores


def test_nothing_the_killed_training_did_reached_the_registry_and_nothing_is_half_done(scenario, client):
    sources = {v.tags["source_run_id"] for v in client.search_model_versions("")}
    assert sources and sources.isdisjoint(scenario.killed.statuses)
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
    in-process in tests/integration/test_robustness.py."""
    runs = []  # on the store fixture's store, made before they start (the scenario above says why)
    for entry_point, params, _ in BAD_INPUT:
        data = {"data_dir": str(tiny_data)} if entry_point != "infer" else {"input": str(tiny_data / "test")}
        runs.append((entry_point, {**data, **params}, store, None))
    for (entry_point, _, message), done in zip(BAD_INPUT, mlflow_runs_at_once(*runs), strict=True):
        assert done.returncode != 0, entry_point
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-3000:]
        assert "Traceback" not in done.stderr


def test_every_experiment_opens_in_the_model_training_view_and_runs_have_names(scenario, client):
    """MLflow 3's UI opens an experiment without a kind in its GenAI view: every experiment the
    pipeline used, the pipeline/ ones `mlflow run` created included, carries the model-training kind."""
    experiments = client.search_experiments(filter_string="name LIKE '%/e2e%'")
    assert {e.name for e in experiments} >= {"pipeline/e2e", "train/e2e", "eval/e2e", "infer/e2e", "pipeline/e2e-twin"}
    for experiment in experiments:
        assert experiment.tags.get(contract.TAG_EXPERIMENT_KIND) == contract.EXPERIMENT_KIND, experiment.name
    evaluation = client.get_run(scenario.first[contract.TAG_EVAL_RUN_ID])
    assert evaluation.data.tags[contract.TAG_RUN_NAME].startswith("evaluate ")
