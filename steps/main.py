"""Entry point ``main``: the driver that chains ``train``, ``evaluate`` and ``infer`` with ``mlflow.run``.

Each stage is its own MLflow run in ``<stage>/<experiment>``, started with the parameters main
resolved (``steps.mlflow_io.stages``). The best run ID goes from train to evaluate through MLflow
(the train run's ``best_run_id`` tag, read with the client), never through files or stdout.
``infer`` scores the test images with ``models:/Production_Reg@prod`` when that alias exists;
otherwise it is skipped and the reason recorded. A finished stage with the same fingerprint
(entry point, parameters, code, data) whose outputs are still there is reused instead of run again
(docs/stages.md). Parameters: ``MLproject``. Tags on its own run: docs/mlflow.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import mlflow
from mlflow.entities import Run

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.core.errors import PipelineError
from steps.datasets.elpv import ensure_data
from steps.mlflow_io import fingerprint
from steps.mlflow_io.records import log_config
from steps.mlflow_io.registry import alias_version
from steps.mlflow_io.runs import name_run, stage_run
from steps.mlflow_io.stages import (
    ENTRY_POINTS,
    output_intact,
    reusable,
    reuse_plan,
    run_stage,
    split_digest,
    stage_parameters,
    trained_model_loads,
    version_exists,
)

logger = logging.getLogger(__name__)


def main(config: Config, env_manager: str = "", reuse: str = "", rerun: str = "") -> dict[str, str]:
    """Run the whole pipeline; return the tags written on main's run."""
    parameters.check_choices("main", {"env_manager": env_manager, "reuse": reuse})
    env_manager = env_manager.strip().lower() or "local"
    may_reuse = reuse_plan(reuse, rerun)
    client = mlflow.MlflowClient()
    params = stage_parameters(config)
    data_dir = ensure_data(config)  # before its digest: the first run fills data/ from ELPV
    code = fingerprint.code_digest()
    with stage_run(contract.STAGE_PIPELINE, config.experiment) as run:
        name_run(f"main {config.experiment}")
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
