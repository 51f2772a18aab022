"""Entry point ``main``: the driver that chains ``train``, ``evaluate`` and ``infer`` with ``mlflow.run``.

Parameters (an empty value keeps ``conf/``): ``experiment``, ``hparams``, ``epochs``,
``image_size``, ``data_dir``, ``seed`` (forwarded to train), ``skip_bad_images`` (to train and
evaluate), ``threshold``, ``min_improvement`` (to evaluate),
``input``, ``output`` (to infer), ``env_manager`` (for the nested runs, default ``local``).

Each stage is its own MLflow run in ``<stage>/<experiment>``, started with ``mlflow.run`` and
the resolved parameters. The best run ID goes from train to evaluate through MLflow (the train run's
``best_run_id`` tag, read with the client), never through files or stdout. ``infer`` runs on the
test images with ``models:/Production_Reg@prod`` when that alias exists; otherwise it is skipped
and the reason is recorded.

Writes on its own run (meant for ``pipeline/<experiment>``: pass ``--experiment-name`` to
``mlflow run``, which creates the run): tags ``train_run_id``, ``best_run_id``, ``eval_run_id``,
``infer_run_id`` (or ``infer_skipped``), ``registered_model``, ``registered_version``.
"""

from __future__ import annotations

import logging

import mlflow

from steps import cli, contract, parameters
from steps.config import PROJECT_DIR, Config
from steps.errors import PipelineError
from steps.records import log_config
from steps.registry import alias_version
from steps.runs import ensure_experiment, stage_run

logger = logging.getLogger(__name__)


def stage_parameters(config: Config) -> dict[str, dict[str, str]]:
    """What main passes to each stage: the values it resolved (``steps.parameters``), so every stage
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


def run_stage(stage: str, parameters: dict[str, str], config: Config, env_manager: str) -> str:
    """Run one entry point as its own MLflow run in ``<stage>/<experiment>``; return its run ID."""
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
            synchronous=True,
        )
    except mlflow.exceptions.ExecutionException as err:
        raise PipelineError(f"the {ENTRY_POINTS[stage]} stage failed ({err}); its output is above") from None
    return submitted.run_id


def main(config: Config, env_manager: str = "") -> dict[str, str]:
    """Run the whole pipeline; return the tags written on main's run."""
    env_manager = env_manager or "local"
    if env_manager not in ("local", "uv", "virtualenv", "conda"):
        raise PipelineError(f"parameter env_manager: expected one of local, uv, virtualenv, conda, got {env_manager!r}")
    client = mlflow.MlflowClient()
    params = stage_parameters(config)
    with stage_run(contract.STAGE_PIPELINE, config.experiment) as run:
        log_config(config)
        tags: dict[str, str] = {}

        tags[contract.TAG_TRAIN_RUN_ID] = run_stage(
            contract.STAGE_TRAIN, params[contract.STAGE_TRAIN], config, env_manager
        )
        best = client.get_run(tags[contract.TAG_TRAIN_RUN_ID]).data.tags.get(contract.TAG_BEST_RUN_ID)
        if not best:
            raise PipelineError(
                f"train run {tags[contract.TAG_TRAIN_RUN_ID]} finished without a {contract.TAG_BEST_RUN_ID} tag"
            )
        tags[contract.TAG_BEST_RUN_ID] = best
        mlflow.set_tags(tags)  # recorded as we go, so a failed later stage still leaves the trail

        eval_params = {"run_id": best, **params[contract.STAGE_EVAL]}
        tags[contract.TAG_EVAL_RUN_ID] = run_stage(contract.STAGE_EVAL, eval_params, config, env_manager)
        eval_tags = client.get_run(tags[contract.TAG_EVAL_RUN_ID]).data.tags
        tags[contract.TAG_REGISTERED_MODEL] = eval_tags[contract.TAG_REGISTERED_MODEL]
        tags[contract.TAG_REGISTERED_VERSION] = eval_tags[contract.TAG_REGISTERED_VERSION]
        mlflow.set_tags(tags)

        if alias_version(config.registry.production, config.registry.alias) is not None:
            tags[contract.TAG_INFER_RUN_ID] = run_stage(
                contract.STAGE_INFER, params[contract.STAGE_INFER], config, env_manager
            )
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
