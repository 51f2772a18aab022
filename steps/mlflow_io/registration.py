"""Registering a model ``evaluate`` scored: which train run's model may be registered, the registry its score
chooses, re-scoring the champion on a new test set, and settling ``prod`` by the rule (``steps.mlflow_io.registry``)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlflow

from steps.core import contract
from steps.core.config import RUN_ID, SIGNIFICANT, Config, RegistryConfig
from steps.core.errors import ModelError, PipelineError, first_line
from steps.mlflow_io import registry, rule
from steps.mlflow_io.loading import pipeline_model_problem
from steps.mlflow_io.registry import alias_version
from steps.mlflow_io.runs import get_run
from steps.network.scoring import score
from steps.network.statistics import Paired, significant_win
from steps.served import serving

if TYPE_CHECKING:
    from steps.network.evaluation import TestSet

logger = logging.getLogger(__name__)


def choose_registry(accuracy: float, threshold: float, registry: RegistryConfig) -> str:
    """Production at or above the threshold, testing below it."""
    return registry.production if accuracy >= threshold else registry.testing


def resolve_model_run(run_id: str) -> str:
    """The run whose model to score: the run itself, or a train parent's ``best_run_id``; finished only."""
    if not RUN_ID.fullmatch(run_id):
        raise PipelineError(f"parameter run_id: expected a 32-character MLflow run ID (0-9, a-f), got {run_id!r}")
    run = get_run(run_id)
    best = run.data.tags.get(contract.TAG_BEST_RUN_ID)
    if best:
        logger.info("run %s is a train parent run; scoring its best run %s", run_id, best)
        run = get_run(best)
    if run.info.status != "FINISHED":
        # A killed or failed training may have left a model file behind; it was never chosen.
        raise PipelineError(
            f"run {run.info.run_id} is {run.info.status}, not FINISHED: only a finished train run is "
            "evaluated; rerun `mlflow run . -e train`"
        )
    # best_run_id is a tag anyone can set: only this store's train runs are registered.
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
    if not experiment.startswith(contract.experiment_name(contract.STAGE_TRAIN, "")):
        raise PipelineError(
            f"run {run.info.run_id} is in experiment {experiment!r}, not a train/ experiment: only models "
            "trained by `mlflow run . -e train` are evaluated and registered"
        )
    return run.info.run_id


def load_model_info(run_id: str):
    uri = f"runs:/{run_id}/{contract.MODEL_ARTIFACT}"
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception:  # MLflow raises several types for "no such model"
        raise PipelineError(
            f"run {run_id!r} has no logged model '{contract.MODEL_ARTIFACT}'; pass a train run: the "
            "train parent run or its best_run_id tag (run `mlflow run . -e train` first)"
        ) from None
    problem = pipeline_model_problem(info)
    if problem:
        raise ModelError(f"run {run_id}'s model is not one train logged: {problem}; it is not registered")
    return info


@dataclass(frozen=True)
class Outcome:
    """Where the model went and what happened to ``prod``."""

    registered_model: str
    version: str
    promoted: bool
    reason: str
    champion: str | None  # the prod version the model was compared with (the holder, unless promoted)
    champion_acc: float | None  # its accuracy on this test set


def rescore(client: mlflow.MlflowClient, reg: RegistryConfig, test: TestSet, digest: str, version: str) -> float | None:
    """Score a production version on this test set and record it.

    None (and a warning) when the version was registered by hand (no ``eval_run_id``) or its
    ``MLmodel`` does not have the pipeline's layout: it can never be scored, and counts as
    unscored. A version whose files cannot be read (missing, no permission, the store or its
    artifacts did not answer) fails the stage with ``prod`` untouched, naming the way out: a
    champion must not lose ``prod`` because its files were moved or a download failed once.
    """
    uri = f"models:/{reg.production}/{version}"
    before = client.get_model_version(reg.production, version).tags
    prod = f"{reg.production}@{reg.alias}"
    way_out = (
        f"{prod} left on version {version}; restore its files (or rerun when the store answers), or move "
        f"{reg.alias} to another version: mlflow run . -e promote -P version=<N> -P reason=..."
    )
    try:
        if contract.VERSION_TAG_EVAL_RUN_ID not in before:  # registered by hand, not by evaluate
            raise ModelError(f"registered by hand (no {contract.VERSION_TAG_EVAL_RUN_ID} tag)")
        info = mlflow.models.get_model_info(uri)
        problem = pipeline_model_problem(info)
        if problem is None:
            size = int((info.metadata or {})[serving.IMAGE_SIZE])  # checked by pipeline_model_problem
            acc = score(test.y, test.predict(uri, size))[0][contract.METRIC_TEST_ACCURACY]
    except ModelError as err:  # refused by load_keras: it never will load
        problem = str(err)
    except Exception as err:  # noqa: BLE001 - missing files, permissions, a store that did not answer
        raise ModelError(
            f"cannot read prod version {version} to score it on this test set ({type(err).__name__}: "
            f"{first_line(err)}); {way_out}"
        ) from None
    if problem is not None:
        logger.warning(
            "prod version %s cannot be scored on this test set (%s); it counts as unscored", version, problem
        )
        mlflow.set_tag(
            contract.TAG_CHAMPION_RESCORED, f"version {version}: not a model of this pipeline ({problem})"[:500]
        )
        return None
    registry.record_score(client, reg.production, version, acc, digest)
    was = f"{before.get(contract.VERSION_TAG_ACC)} on test set {before.get(contract.VERSION_TAG_TEST_DIGEST)}"
    mlflow.set_tag(contract.TAG_CHAMPION_RESCORED, f"version {version}: acc {acc!r} on test set {digest} (was {was})")
    logger.info("prod version %s scores %.4f on this test set (was %s)", version, acc, was)
    return acc


def register_and_promote(
    client: mlflow.MlflowClient,
    config: Config,
    model_uri: str,
    accuracy: float,
    digest: str,
    tags: Mapping[str, str],
    *,
    eval_run_id: str | None = None,
    rescore: Callable[[str], float | None] | None = None,
    verify: Callable[[str], object] | None = None,
    before_write: Callable[[], None] | None = None,
    paired: tuple[str, Paired] | None = None,
) -> Outcome:
    """Register by the threshold, then settle ``prod`` by the promotion rule (steps.mlflow_io.registry), unless
    ``evaluate.promote`` is false: then the version is tagged ``prod_ineligible`` and ``prod`` stays;
    ``verify`` checks the files of any other version before ``prod`` moves to it (this one's were
    checked before it was registered). ``paired``: the holder of ``prod`` this model was compared with,
    image by image, and the comparison; with ``evaluate.promotion`` significant, only a significant
    win over that holder may move ``prod``, and only to this version."""
    reg = config.registry
    name = choose_registry(accuracy, config.evaluate.threshold, reg)
    version_tags = {**registry.score_tags(accuracy, digest), **tags}
    if not config.evaluate.promote:
        version_tags[contract.VERSION_TAG_INELIGIBLE] = (
            f"registered by eval run {eval_run_id} with evaluate.promote false"
        )
    version = str(mlflow.register_model(model_uri, name, tags=version_tags).version)
    if name == reg.production and not config.evaluate.promote:
        holder = alias_version(reg.production, reg.alias)
        reason = (
            f"evaluate.promote is false: version {version} (acc {accuracy:.4f}) is registered and marked "
            f"{contract.VERSION_TAG_INELIGIBLE}; {reg.alias} is left {f'on version {holder}' if holder else 'unset'}"
        )
        return Outcome(name, version, False, reason, holder, None)
    if name != reg.production:
        # Version numbers restart per registered model: Testing_Reg v1 is not Production_Reg v1.
        reason = (
            f"test accuracy {accuracy:.4f} is below the threshold {config.evaluate.threshold}: registered in "
            f"{name}, which never holds {reg.alias}"
        )
        return Outcome(name, version, False, reason, alias_version(reg.production, reg.alias), None)

    candidates, significance = None, ""
    if config.evaluate.promotion == SIGNIFICANT:
        candidates, significance = significant_candidates(version, paired, alias_version(reg.production, reg.alias))
    settled = registry.settle(
        client,
        reg,
        digest,
        config.evaluate.min_improvement,
        run_id=eval_run_id,
        rescore=rescore,
        verify=None if verify is None else (lambda other: other == version or verify(other)),
        before_write=before_write,
        candidates=candidates,
    )
    scored = {v.version: v for v in settled.versions}
    promoted = settled.holder == version
    # Promoted: compared with the holder before us. Not: with the holder that kept prod.
    champion = settled.start if promoted else settled.holder
    other = None if champion is None else scored.get(champion, rule.Scored(champion, None))
    # Judged as the rule alone would: a version kept out by the paired test is not blocked otherwise.
    mine = scored[version] if candidates is None else dataclasses.replace(scored[version], blocked=False)
    takes, reason = rule.judge(mine, other, config.evaluate.min_improvement)
    if significance and takes and not promoted:  # the highest acc would have moved prod; the test did not
        reason = f"{significance}; by acc alone: {reason}"
    return Outcome(name, version, promoted, reason, champion, other.acc if other else None)


def significant_candidates(version: str, paired: tuple[str, Paired] | None, holder: str | None) -> tuple[set[str], str]:
    """Who may take ``prod`` under ``evaluate.promotion`` significant, and why: this version when it
    beat the holder at p < 0.05 on the same images, no one otherwise (a pairwise test orders only
    the two it compares). With no holder yet, the rule's usual choice stands."""
    if holder is None:
        return {version}, ""
    if paired is None or paired[0] != holder:
        return (
            set(),
            f"no paired comparison with prod version {holder} on this test set (evaluate.promotion significant)",
        )
    result = paired[1]
    if significant_win(result):
        return {version}, ""
    return set(), (
        f"not a significant win over prod version {holder} (McNemar p {result.p_value:.3g}; right only here "
        f"{result.challenger_only}, only there {result.other_only}; evaluate.promotion significant needs p < 0.05)"
    )
