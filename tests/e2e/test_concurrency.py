"""Concurrency: several evaluations promoting at the same moment leave `prod` on the best version.

Each evaluation is a separate process (spawned, as separate `mlflow run`s would be) running
evaluate's own registry step, `register_and_promote`, after scoring: register the version, then
settle `prod`. Every round the processes are scheduled against the rule, randomised around the
worst case for "last writer wins": better models register later and write sooner, worse ones read
early and pause between their last read and their write. A single read-decide-write (no re-read)
gets rounds wrong under this schedule (16 of 20 when measured; the last test here shows the
harness catches it), and `settle` must get every round right. Against one SQLite store, and against a
real `mlflow server` on loopback backed by PostgreSQL where it is installed (.ci/run installs it),
else by SQLite.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time

import mlflow
import pytest

from helpers import assert_store_consistent, empty_store, running_server, without_spark_connect
from steps.core.loader import load_config
from steps.mlflow_io import registry, rule
from steps.mlflow_io.registry import alias_version

pytestmark = pytest.mark.e2e

PROCESSES = 4
ROUNDS = 6
DIGEST = "cccccccccccccccc"


def single_pass_settle(
    client, reg, digest, min_improvement, *, run_id=None, rescore=None, verify=None, before_write=None, candidates=None
):
    """What settle would be without its re-read and pre-write check: read, decide, write once."""
    current = alias_version(reg.production, reg.alias)
    versions = registry.read_versions(client, reg.production, digest)
    target, reason = rule.decide(current, versions, min_improvement)
    if target is None or target == current:
        return registry.Settled(current, current, versions)
    before_write()
    registry.move_alias(client, reg, target, current, "evaluate", reason, run_id)
    return registry.Settled(current, target, versions)


def evaluation(
    uri: str, source: str, model_name: str, acc: float, start_at: float, pause: float, naive: bool
) -> tuple[str, float]:
    """One evaluation's registry step, in its own process, starting at ``start_at`` and pausing
    ``pause`` seconds between its last read and its write; returns (version, acc)."""
    from steps.mlflow_io.registration import register_and_promote

    # A fresh worker process per task would be slow; restore the real settle after a naive round.
    registry.settle = single_pass_settle if naive else REAL_SETTLE
    mlflow.set_tracking_uri(uri)
    config = load_config({"registry.production": model_name, "registry.testing": f"{model_name}_testing"})
    time.sleep(max(0.0, start_at - time.time()))
    outcome = register_and_promote(
        mlflow.MlflowClient(),
        config,
        source,
        acc,
        DIGEST,
        {},
        before_write=lambda: time.sleep(pause),
    )
    return outcome.version, acc


REAL_SETTLE = registry.settle


def race(uri: str, pool, prefix: str, naive: bool = False) -> list[str]:
    """ROUNDS rounds of PROCESSES simultaneous evaluations; returns what went wrong, round by round."""
    mlflow.set_tracking_uri(uri)
    # A model without files: the registry steps need a source a server accepts, not a real model.
    source = f"models:/{mlflow.create_external_model(name='race').model_id}"
    rng = random.Random(2019)
    wrong: list[str] = []
    for round_no in range(ROUNDS):
        name = f"{prefix}_{round_no}"
        # Ties on purpose: two processes often share the best score.
        accs = [rng.choice([0.70, 0.75, 0.80, 0.85]) for _ in range(PROCESSES)]
        # A hostile schedule, the worst case for "last writer wins": better models register later
        # and write sooner; worse ones read early and write late. Randomised around that.
        ranks = sorted(range(PROCESSES), key=lambda i: -accs[i])
        tick = time.time() + 0.5
        jobs = [
            pool.apply_async(
                evaluation,
                (
                    uri,
                    source,
                    name,
                    accs[i],
                    tick + 0.08 * (PROCESSES - 1 - rank) + rng.uniform(0, 0.03),
                    0.1 * rank + rng.uniform(0, 0.1),
                    naive,
                ),
            )
            for rank, i in enumerate(ranks)
        ]
        results = dict(job.get(timeout=120) for job in jobs)

        client = mlflow.MlflowClient(uri)
        holder = str(client.get_model_version_by_alias(name, "prod").version)
        events = rule.history_events(client.get_registered_model(name).tags, "prod")
        if results[holder] != max(accs) or events[-1]["to"] != holder or len(results) != PROCESSES:
            wrong.append(f"round {round_no}: prod on {holder}, last recorded move to {events[-1]['to']}, {results}")
    return wrong


def warm_up() -> None:
    without_spark_connect()  # a process spawned from an xdist worker has no __main__ file either
    import steps.evaluate  # noqa: F401 - imported before the first round, so round 0 races too


@pytest.fixture(scope="module")
def pool():
    workers = multiprocessing.get_context("spawn").Pool(PROCESSES, initializer=warm_up)
    try:
        yield workers
    finally:
        # Not Pool.terminate (what `with Pool()` does): it SIGTERMs the workers and joins them with no
        # time limit, and CI once hung there for the rest of its 90 minutes. Workers are asked to
        # finish and given a minute; any left are killed and named, so a stuck one fails the suite
        # instead of hanging it.
        workers.close()
        deadline = time.monotonic() + 60
        stuck = [p for p in multiprocessing.active_children() if not finished(p, deadline - time.monotonic())]
        workers.join()
        assert not stuck, f"pool workers that did not exit within a minute of close(): {stuck}"


def finished(process, timeout: float) -> bool:
    """Join ``process`` within ``timeout`` seconds; kill it if it is still alive after that."""
    process.join(max(0.0, timeout))
    if process.is_alive():
        process.kill()
        process.join()
        return False
    return True


def stage_in_a_fresh_store(uri: str, data_dir: str, start_at: float) -> str:
    """The prepare stage as its CLI runs it, starting at ``start_at``; "ok" or the error it ended with."""
    from steps import prepare
    from steps.core import cli

    os.environ["MLFLOW_TRACKING_URI"] = uri
    time.sleep(max(0.0, start_at - time.time()))
    try:
        cli.main(prepare.prepare, "", prepare.OVERRIDES, argv=["--data_dir", data_dir, "--experiment", "fresh"])
    except BaseException as err:  # noqa: BLE001 - reported back to the test, whatever it is
        return f"{type(err).__name__}: {err}"
    return "ok"


def test_stages_starting_together_on_a_brand_new_sqlite_store_all_succeed(pool, tmp_path, tiny_data):
    """MLflow creates a SQLite store's tables on first use without a lock, and processes starting
    together race ("table metrics already exists", 10 of 12 failed when tried by hand); the
    pipeline takes a lock file for that first use (tracking.create_sqlite_store)."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # not even its folder exists yet
    tick = time.time() + 1.0
    jobs = [pool.apply_async(stage_in_a_fresh_store, (uri, str(tiny_data), tick)) for _ in range(PROCESSES)]
    assert [job.get(timeout=120) for job in jobs] == ["ok"] * PROCESSES
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("prepare/fresh").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] * PROCESSES
    assert_store_consistent(client)


def test_parallel_evaluations_leave_prod_on_the_best_version_in_sqlite(pool, tmp_path):
    # The store exists before any evaluation, as it does after train: MLflow's first-use schema
    # creation is not safe for several processes at once ("table ... already exists").
    uri = empty_store(tmp_path / "mlflow.db")
    assert race(uri, pool, "Race") == []


def test_parallel_evaluations_leave_prod_on_the_best_version_through_a_server(pool, tmp_path, server_backend):
    with running_server(tmp_path, server_backend) as uri:
        assert race(uri, pool, "ServerRace") == []


def test_the_race_catches_a_promotion_that_does_not_read_again(pool, tmp_path):
    """The harness can fail: with one read-decide-write per evaluation, prod ends up wrong."""
    uri = empty_store(tmp_path / "mlflow.db")
    assert race(uri, pool, "Naive", naive=True) != []
