"""Moving ``prod`` by hand, beside the rule: whether a version may hold it, keeping the chosen version
unblocked when promotes race, and checking the files of versions registered before evaluate checked them."""

from __future__ import annotations

import logging

import mlflow

from steps.core import contract
from steps.core.config import Config
from steps.core.errors import ModelError, PipelineError
from steps.mlflow_io import registry, rule
from steps.mlflow_io.registry import alias_version
from steps.served import provenance

logger = logging.getLogger(__name__)


def check_promotable(client: mlflow.MlflowClient, config: Config, version: str):
    """The model version, or a PipelineError saying why it cannot hold ``prod``."""
    reg = config.registry
    try:
        found = client.get_model_version(reg.production, version)
    except mlflow.exceptions.MlflowException:
        found = None
    if found is None:
        try:
            client.get_model_version(reg.testing, version)
            elsewhere = (
                f"; {reg.testing} has a version {version}, but it scored below the threshold and cannot hold "
                f"{reg.alias} (re-evaluate its run with a lower -P threshold to register it in {reg.production})"
            )
        except mlflow.exceptions.MlflowException:
            elsewhere = ""
        existing = sorted(
            (int(v.version) for v in client.search_model_versions(f"name = '{reg.production}'")), reverse=True
        )
        listed = f"; it has versions {', '.join(map(str, existing[:10]))}" if existing else "; it has no versions yet"
        raise PipelineError(f"{reg.production} has no version {version}{elsewhere if elsewhere else listed}")
    tags = found.tags
    if rule.parse_acc(tags.get(contract.VERSION_TAG_ACC)) is None or not tags.get(contract.VERSION_TAG_TEST_DIGEST):
        raise PipelineError(
            f"{reg.production} version {version} has no test score ({contract.VERSION_TAG_ACC} and "
            f"{contract.VERSION_TAG_TEST_DIGEST}); register models with `mlflow run . -e evaluate`, which scores them"
        )
    if pruned := tags.get(contract.VERSION_TAG_PRUNED):
        raise ModelError(
            f"{reg.production} version {version}'s files were pruned by the store's retention rule ({pruned}); "
            "its entry and scores are kept, but it cannot be served: choose another version"
        )
    provenance.check_version(client, reg.production, version)  # its files, recomputed: never the tags alone
    return found


def keep_unblocked(client: mlflow.MlflowClient, config: Config, version: str, digest: str, note: str) -> list[str]:
    """After the move: ``prod`` still on ``version`` and ``version`` not blocked, or a ``PipelineError``.

    MLflow has no compare-and-set for aliases: another promote may have blocked ``version`` between
    this one's checks and its move (a rollback to an older version blocks the better ones). This
    move came last, so this choice stands: as any promote by hand, it unblocks its version and
    blocks again what the rule would hand ``prod`` to instead. Returns the versions it blocked.
    """
    reg, prod = config.registry, f"{config.registry.production}@{config.registry.alias}"
    blocked: list[str] = []
    for _ in range(registry.MAX_ROUNDS):
        now = alias_version(reg.production, reg.alias)
        if now != version:
            raise PipelineError(
                f"{prod} is on version {now}, not {version}: an evaluation moved it while this promote ran (see "
                f"`make prod-history`); rerun promote if version {version} should still hold it"
            )
        if contract.VERSION_TAG_BLOCKED not in client.get_model_version(reg.production, version).tags:
            return blocked
        logger.warning("another promote blocked version %s while this one moved %s to it: unblocking it", version, prod)
        client.delete_model_version_tag(reg.production, version, contract.VERSION_TAG_BLOCKED)
        blocked += registry.pin(client, reg, version, digest, config.evaluate.min_improvement, note)
    raise PipelineError(
        f"{prod} is on version {version}, which other promotes keep blocking; see `make prod-history` and "
        "rerun one promote at a time"
    )


def verify_registered(config: Config) -> dict[str, str]:
    """Check the files of every version of the production model and tag those that pass with their
    code's digest (``code_sha256``), as evaluate tags new ones: for versions registered before
    evaluate checked them, so that ``promote`` (a rollback) can still choose them. A version that
    already has the tag is checked against it. Returns ``{version: digest or why refused}``."""
    client = mlflow.MlflowClient()
    name = config.registry.production
    outcome: dict[str, str] = {}
    refused = 0
    for found in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)):
        version = str(found.version)
        try:
            digest = provenance.verify(f"models:/{name}/{version}")
            recorded = found.tags.get(contract.VERSION_TAG_CODE_SHA256)
            if recorded not in (None, digest):
                raise ModelError(f"its {contract.VERSION_TAG_CODE_SHA256} tag does not match its code; left as it is")
        except ModelError as err:
            refused += 1
            outcome[version] = f"refused: {err}"
            print(f"{name} version {version}: {outcome[version]}")
            continue
        if recorded is None:
            client.set_model_version_tag(name, version, contract.VERSION_TAG_CODE_SHA256, digest)
        outcome[version] = digest
        print(f"{name} version {version}: verified, code sha256 {digest}")
    if refused:
        raise ModelError(
            f"{refused} of {len(outcome)} versions of {name} are refused (above); promote cannot choose them"
        )
    return outcome
