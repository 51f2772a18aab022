"""Entry point ``main``: the driver that chains ``train``, ``evaluate`` and ``infer`` with ``mlflow.run``.

Parameters (an empty value keeps ``conf/``): ``experiment``, ``hparams``, ``epochs``,
``image_size``, ``data_dir``, ``seed`` (forwarded to train), ``skip_bad_images`` (to train and
evaluate), ``threshold``, ``min_improvement`` (to evaluate),
``input``, ``output`` (to infer), ``env_manager`` (for the nested runs, default ``local``),
``reuse`` (empty or ``true``: reuse finished train and evaluate runs; ``false``: run every stage;
``all``: infer too) and ``rerun`` (stages to run again, with every stage after them).

Reuse: each stage run is tagged ``pipeline.fingerprint`` (``steps/mlflow_io/fingerprint.py``: entry point,
parameters, code, data). Before a stage, main looks in its experiment for the newest FINISHED,
never-reaped run with the same fingerprint whose outputs are still there (train: the best model
loads; evaluate: its registered version exists; infer: its output file, with the digest it was
written with) and takes it instead of running the stage; a
reused evaluation registers nothing and leaves ``prod`` alone. Infer's input is usually new: it
runs again unless ``reuse=all``.

Each stage is its own MLflow run in ``<stage>/<experiment>``, started with ``mlflow.run`` and
the resolved parameters. The best run ID goes from train to evaluate through MLflow (the train run's
``best_run_id`` tag, read with the client), never through files or stdout. ``infer`` runs on the
test images with ``models:/Production_Reg@prod`` when that alias exists; otherwise it is skipped
and the reason is recorded.

Writes on its own run (meant for ``pipeline/<experiment>``: pass ``--experiment-name`` to
``mlflow run``, which creates the run): tags ``train_run_id``, ``best_run_id``, ``eval_run_id``,
``infer_run_id`` (or ``infer_skipped``), ``registered_model``, ``registered_version``, and
``<stage>_reused_from`` (``train``, ``eval``, ``infer``: the run reused and when it started).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities import Run

from steps.core import cli, contract, parameters
from steps.core.config import PROJECT_DIR, Config
from steps.core.errors import PipelineError
from steps.datasets.data import digest, manifest, scan_split
from steps.datasets.elpv import ensure_data
from steps.mlflow_io import fingerprint
from steps.mlflow_io.records import log_config
from steps.mlflow_io.registry import alias_version
from steps.mlflow_io.runs import ensure_experiment, stage_run
from steps.mlflow_io.tracking import first_line

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
REUSE = ("true", "false", "all")


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
    reuse = reuse.strip().lower() or "true"
    if reuse not in REUSE:
        raise PipelineError(f"parameter reuse: expected one of {', '.join(REUSE)}, got {reuse!r}")
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


def main(config: Config, env_manager: str = "", reuse: str = "", rerun: str = "") -> dict[str, str]:
    """Run the whole pipeline; return the tags written on main's run."""
    env_manager = env_manager or "local"
    if env_manager not in ("local", "uv", "virtualenv", "conda"):
        raise PipelineError(f"parameter env_manager: expected one of local, uv, virtualenv, conda, got {env_manager!r}")
    may_reuse = reuse_plan(reuse, rerun)
    client = mlflow.MlflowClient()
    params = stage_parameters(config)
    data_dir = ensure_data(config)  # before its digest: the first run fills data/ from ELPV
    code = fingerprint.code_digest()
    with stage_run(contract.STAGE_PIPELINE, config.experiment) as run:
        log_config(config)
        tags: dict[str, str] = {}

        def stage(name: str, parameters: dict[str, str], data: str, usable: Callable[[Run], str | None]) -> Run:
            """The stage's run: a reusable one if allowed and found, else a new one."""
            print_ = fingerprint.fingerprint(ENTRY_POINTS[name], parameters, code, data)
            found = reusable(client, name, config, print_, usable) if name in may_reuse else None
            if found is None:
                return client.get_run(run_stage(name, parameters, config, env_manager, print_))
            when = datetime.fromtimestamp(found.info.start_time / 1000, timezone.utc).isoformat(timespec="seconds")
            logger.info(
                "reusing %s run %s of %s: same code, parameters and data", ENTRY_POINTS[name], found.info.run_id, when
            )
            tags[contract.reused_from_tag(name)] = f"{found.info.run_id} ({when})"
            return found

        train_run = stage(
            contract.STAGE_TRAIN, params[contract.STAGE_TRAIN], split_digest(config, data_dir, "train"),
            trained_model_loads,
        )  # fmt: skip
        tags[contract.TAG_TRAIN_RUN_ID] = train_run.info.run_id
        best = train_run.data.tags.get(contract.TAG_BEST_RUN_ID)
        if not best:
            raise PipelineError(f"train run {train_run.info.run_id} finished without a {contract.TAG_BEST_RUN_ID} tag")
        tags[contract.TAG_BEST_RUN_ID] = best
        mlflow.set_tags(tags)  # recorded as we go, so a failed later stage still leaves the trail

        eval_params = {"run_id": best, **params[contract.STAGE_EVAL]}
        # A reused evaluation registers nothing: its version stays, and prod where the rule put it.
        eval_run = stage(
            contract.STAGE_EVAL, eval_params, split_digest(config, data_dir, "test"), version_exists(client)
        )
        tags[contract.TAG_EVAL_RUN_ID] = eval_run.info.run_id
        tags[contract.TAG_REGISTERED_MODEL] = eval_run.data.tags[contract.TAG_REGISTERED_MODEL]
        tags[contract.TAG_REGISTERED_VERSION] = eval_run.data.tags[contract.TAG_REGISTERED_VERSION]
        mlflow.set_tags(tags)

        prod = alias_version(config.registry.production, config.registry.alias)
        if prod is not None:
            source = Path(config.infer_input)
            if not source.exists():  # a glob: its files are only known to infer; never reused
                may_reuse.discard(contract.STAGE_INFER)
            # The input's content and the version the alias names now: what infer's result depends on.
            inputs = f"{fingerprint.tree_digest(source)}\0{config.registry.production}/{prod}"
            infer_run = stage(contract.STAGE_INFER, params[contract.STAGE_INFER], inputs, output_intact)
            tags[contract.TAG_INFER_RUN_ID] = infer_run.info.run_id
        else:
            reason = f"no {config.registry.production}@{config.registry.alias} yet: no model has passed the threshold"
            logger.warning("skipping infer: %s", reason)
            tags[contract.TAG_INFER_SKIPPED] = reason
        mlflow.set_tags(tags)
        logger.info("pipeline run %s: %s", run.info.run_id, tags)
    return tags


OVERRIDES = parameters.overrides("main")

if __name__ == "__main__":
    cli.main(main, "Run train, evaluate and infer as one pipeline.", OVERRIDES, own=parameters.own("main"))
