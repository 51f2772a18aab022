"""Running the pipeline's stages with ``mlflow.run``: the parameters ``main`` passes each stage, one stage as
its own run, and reuse (a finished run with the same fingerprint whose outputs are still there)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.entities import Run

from steps.core import contract, parameters
from steps.core.config import PROJECT_DIR, Config
from steps.core.errors import PipelineError, first_line
from steps.datasets.data import digest, manifest, scan_split
from steps.mlflow_io.runs import ensure_experiment

logger = logging.getLogger(__name__)


def stage_parameters(config: Config) -> dict[str, dict[str, str]]:
    """What main passes to each stage: the values it resolved (``steps.core.parameters``), so every stage
    runs on the same ones."""
    return {
        contract.STAGE_TRAIN: parameters.stage_arguments("train", config),  # epochs, image_size: None keeps each set's
        contract.STAGE_EVAL: parameters.stage_arguments("evaluate", config),
        contract.STAGE_INFER: parameters.stage_arguments(
            "infer",
            config,
            # Images the user chose to skip in training may be in the input too: not a failure then.
            {"allow_errors": config.infer.allow_errors or config.data.skip_bad_images},
        ),
    }


# Stage name in the contract -> MLproject entry point.
ENTRY_POINTS = {contract.STAGE_TRAIN: "train", contract.STAGE_EVAL: "evaluate", contract.STAGE_INFER: "infer"}


STAGES = tuple(ENTRY_POINTS)  # in order: rerunning one reruns those after it


def run_stage(stage: str, parameters: dict[str, str], config: Config, env_manager: str, fingerprint: str) -> str:
    """Run one entry point as its own MLflow run in ``<stage>/<experiment>``, tagged with its
    fingerprint from the start (so a run that fails or is killed shows what it was); its run ID."""
    experiment = contract.experiment_name(stage, config.experiment)
    ensure_experiment(experiment)  # created here so its artifacts sit beside a SQLite store
    logger.info("running %s in %s with %s", ENTRY_POINTS[stage], experiment, parameters)
    try:
        submitted = mlflow.run(
            str(PROJECT_DIR),
            entry_point=ENTRY_POINTS[stage],
            parameters=parameters,
            experiment_name=experiment,  # a run started by mlflow.run cannot switch experiment later
            env_manager=env_manager,  # not inherited from the outer `mlflow run`
            synchronous=False,  # to tag the run before it ends; waited for below, as mlflow.run waits
        )
    except mlflow.exceptions.ExecutionException as err:
        raise PipelineError(f"the {ENTRY_POINTS[stage]} stage failed ({err}); its output is above") from None
    client = mlflow.MlflowClient()
    try:
        client.set_tag(submitted.run_id, contract.TAG_FINGERPRINT, fingerprint)
        succeeded = submitted.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stop the stage too, as a synchronous mlflow.run does
        submitted.cancel()
        _wait_closed(client, submitted.run_id)
        _close(client, submitted.run_id, "KILLED")
        raise
    if not succeeded:
        _close(client, submitted.run_id, "FAILED")
        raise PipelineError(f"the {ENTRY_POINTS[stage]} stage failed (run {submitted.run_id}); its output is above")
    _close(client, submitted.run_id, "FINISHED")
    return submitted.run_id


# How long main waits, once stopped, for a cancelled stage to close its runs itself.
STAGE_CLOSE_SECONDS = 60


def _wait_closed(client: mlflow.MlflowClient, run_id: str) -> None:
    """Wait until the stage's run has ended: ``cancel`` waits only for the stage's `mlflow run`
    command, which SIGTERM ends at once, while the stage itself is still closing its runs."""
    deadline = time.monotonic() + STAGE_CLOSE_SECONDS
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)


def _close(client: mlflow.MlflowClient, run_id: str, status: str) -> None:
    """End the stage's run with ``status`` unless the stage ended it itself."""
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def reusable(
    client: mlflow.MlflowClient, stage: str, config: Config, fingerprint: str, usable: Callable[[Run], str | None]
) -> Run | None:
    """The newest FINISHED run of ``stage`` in its experiment with this fingerprint whose outputs are
    still there (``usable`` says what is wrong with a run, or None); None if there is none."""
    experiment = client.get_experiment_by_name(contract.experiment_name(stage, config.experiment))
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{contract.TAG_FINGERPRINT}` = '{fingerprint}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    for run in runs:
        if contract.TAG_REAPED in run.data.tags:  # closed by a later stage: never trusted
            continue
        problem = usable(run)
        if problem is None:
            return run
        logger.warning("not reusing %s run %s: %s", ENTRY_POINTS[stage], run.info.run_id, problem)
    return None


def trained_model_loads(run: Run) -> str | None:
    """Why a train run cannot be reused (no best run, or its model does not load), or None."""
    best = run.data.tags.get(contract.TAG_BEST_RUN_ID)
    if not best:
        return f"it has no {contract.TAG_BEST_RUN_ID} tag"
    try:
        mlflow.pyfunc.load_model(f"runs:/{best}/{contract.MODEL_ARTIFACT}")
    except Exception as err:  # noqa: BLE001 - any reason the model cannot load is a reason to retrain
        return f"the model of run {best} does not load ({first_line(err)})"
    return None


def version_exists(client: mlflow.MlflowClient) -> Callable[[Run], str | None]:
    def check(run: Run) -> str | None:
        name = run.data.tags.get(contract.TAG_REGISTERED_MODEL)
        version = run.data.tags.get(contract.TAG_REGISTERED_VERSION)
        if not (name and version):
            return "it registered no version"
        try:
            client.get_model_version(name, version)
        except mlflow.exceptions.MlflowException:
            return f"{name} version {version} no longer exists"
        return None

    return check


def output_intact(run: Run) -> str | None:
    """Why an infer run cannot be reused (its output gone or changed since it wrote it), or None."""
    path, written = run.data.tags.get(contract.TAG_OUTPUT), run.data.tags.get(contract.TAG_OUTPUT_SHA256)
    if not (path and written):
        return f"it recorded no {contract.TAG_OUTPUT} and {contract.TAG_OUTPUT_SHA256}"
    try:
        now = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        return f"its output {path} cannot be read ({err.strerror or err})"
    return None if now == written else f"its output {path} has changed since it was written"


def split_digest(config: Config, data_dir: Path, split: str) -> str:
    """What a split's images are, as train and evaluate record it (``steps.datasets.data.digest``): the files'
    contents and classes, whatever their names or folder."""
    return digest(manifest(scan_split(data_dir, split, config.data.classes), split, data_dir))


def reuse_plan(reuse: str, rerun: str) -> set[str]:
    """The stages ``main`` may reuse, from ``-P reuse`` and ``-P rerun`` (rerunning a stage reruns
    those after it); infer only with ``reuse=all``, since its input is usually new."""
    reuse = reuse.strip().lower() or "true"  # its values are checked with main's parameters
    named = [s.strip() for s in rerun.split(",") if s.strip()]
    known = {ENTRY_POINTS[s]: s for s in STAGES}
    unknown = [n for n in named if n not in known]
    if unknown:
        raise PipelineError(f"parameter rerun: expected names among {', '.join(known)}, got {', '.join(unknown)}")
    if reuse == "false":
        return set()
    allowed = set(STAGES) if reuse == "all" else {contract.STAGE_TRAIN, contract.STAGE_EVAL}
    if named:
        first = min(STAGES.index(known[n]) for n in named)
        allowed -= set(STAGES[first:])
    return allowed
