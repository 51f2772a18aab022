"""Runs: the experiment and run each stage writes to, how a run ends when its stage does not finish,
and closing the runs whose process died."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from steps.core import contract, errors, memory, signals
from steps.core.errors import PipelineError, redact
from steps.mlflow_io import mlflow_errors
from steps.mlflow_io.records import library_versions
from steps.mlflow_io.tracking import artifact_root

logger = logging.getLogger(__name__)


def ensure_experiment(name: str) -> str:
    """The experiment's ID, creating it (artifacts beside a SQLite store) if it does not exist; either
    way tagged as a model-training experiment, so MLflow's UI opens it in that view."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = artifact_root(mlflow.get_tracking_uri())
        location = f"{root}/{name.replace('/', '_')}" if root else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=KIND)
        except mlflow.exceptions.MlflowException:
            # Another stage created it between our look-up and our create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    mark_kind(client, experiment)
    return experiment.experiment_id


KIND = {contract.TAG_EXPERIMENT_KIND: contract.EXPERIMENT_KIND}


def name_run(name: str) -> None:
    """Name the active run for what it is (MLflow would show a random pair of words)."""
    mlflow.set_tag(contract.TAG_RUN_NAME, name[:250])


def mark_kind(client: mlflow.MlflowClient, experiment) -> None:
    """Tag an experiment (one created before this tag, or by `mlflow run` itself) with its kind."""
    if experiment.tags.get(contract.TAG_EXPERIMENT_KIND) != contract.EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, contract.TAG_EXPERIMENT_KIND, contract.EXPERIMENT_KIND)


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
        with mlflow.start_run() as run, _closing(under_mlflow_run=True):
            mlflow.set_tags({contract.TAG_PROCESS: process_identity(), **library_versions()})
            client = mlflow.MlflowClient()
            found = client.get_experiment(run.info.experiment_id)
            mark_kind(client, found)  # `mlflow run` created it, without the tag
            actual = found.name
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
def _closing(under_mlflow_run: bool = False) -> Iterator[None]:
    """How a stage's run ends when the stage does not finish: KILLED when it was told to stop,
    even if the work under way swallowed the signal's exception or turned it into another error;
    FAILED otherwise, with its kind (``steps.core.errors``) as the tag ``failure_kind``.
    ``under_mlflow_run``: the run was created by the `mlflow run` command that started this process."""
    try:
        with memory.watch() as window:
            yield
        signals.check()
        _log_memory(window)
    except KeyboardInterrupt:
        # mlflow.start_run's own exit would say FAILED; an interrupted run was killed.
        _killed(under_mlflow_run)
        raise
    except Exception as err:
        if signals.received():
            _killed(under_mlflow_run)
            raise (signals.Terminated() if signals.received() == signal.SIGTERM else KeyboardInterrupt()) from err
        failure = errors.classify(err)
        if failure is errors.STORE:
            # The store does not answer: closing the runs would only retry with backoff once per
            # run before failing too. Fail those calls at once; a rerun marks these runs FAILED.
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        else:
            _record_failure(failure)
        raise


def _log_memory(window: memory.Window) -> None:
    """What the run held at most: its anonymous memory, and the process's resident peak so far."""
    metrics = {contract.METRIC_PEAK_RSS_MB: memory.peak_rss_mb()}
    if window.peak is not None:
        metrics[contract.METRIC_PEAK_ANON_MB] = window.peak
    mlflow.log_metrics(metrics)


# `mlflow run` (MLflow 3.17, projects._maybe_set_run_terminated) marks its run FAILED once its
# command has exited non-zero, unless the run is already terminated; but it compares the status
# string with RunStatus's integer codes, so it always writes FAILED over the KILLED its stage wrote.
# A small process outlives the stage, waits until that `mlflow run` has exited, and puts KILLED back.
_KEEP_KILLED = """
import os, sys, time
parent, run_id = int(sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        break
    time.sleep(0.1)
from mlflow import MlflowClient
client = MlflowClient()
run = client.get_run(run_id)
if run.info.status == "FAILED" and run.data.tags.get(sys.argv[3]) == sys.argv[4]:
    client.set_terminated(run_id, "KILLED")
"""


def _killed(under_mlflow_run: bool) -> None:
    """End the active run KILLED, tagged ``interrupted``; under `mlflow run`, keep it KILLED after."""
    run = mlflow.active_run()
    _record_failure(errors.INTERRUPTED)
    try:
        patiently(mlflow.end_run, RunStatus.to_string(RunStatus.KILLED))
    finally:
        if under_mlflow_run and run is not None:
            args = [str(os.getppid()), run.info.run_id, contract.TAG_FAILURE_KIND, errors.INTERRUPTED.kind]
            subprocess.Popen(
                [sys.executable, "-c", _KEEP_KILLED, *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip


def _record_failure(failure: errors.Failure) -> None:
    """Tag the active run with the kind of its failure; a store that fails this too only loses the tag."""
    try:
        patiently(mlflow.set_tag, contract.TAG_FAILURE_KIND, failure.kind)
    except Exception as err:  # noqa: BLE001 - the run's status and the exit code still say it failed
        logger.debug("could not record the failure kind: %s", err)


def patiently(call: Callable[..., Any], *args: Any, seconds: float = 30.0) -> Any:
    """``call(*args)``, retried while a SQLite store stays locked by another process's write: on an
    interrupt every process of the pipeline closes its runs at once, and SQLite takes one writer."""
    deadline, delay = time.monotonic() + seconds, 0.1
    while True:
        try:
            return call(*args)
        except mlflow.exceptions.MlflowException as err:
            if not mlflow_errors.locked(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


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


def get_run(run_id: str) -> Run:
    """The run, or a ``PipelineError`` saying it does not exist in this store."""
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if mlflow_errors.missing(err):
            raise PipelineError(
                f"run {run_id!r} does not exist in {redact(mlflow.get_tracking_uri())}; run "
                "`mlflow run . -e train` first and pass its best_run_id tag as -P run_id=..."
            ) from None
        raise
