"""Entry point ``promote``: move ``prod`` to a chosen version by hand (a rollback, or a pick), on the record.

Parameters: ``version`` (required: a version number of ``Production_Reg``), ``reason`` (required:
why, kept in the history), ``experiment``.

Refused with a one-line error, ``prod`` unchanged: a version that does not exist, a version of
``Testing_Reg`` (it scored below the threshold), a version without ``acc`` and ``test_digest``
(registered by hand, never scored), a version whose files a store's retention rule pruned.

Writes, in experiment ``promote/<experiment>``, one run with tags ``promoted_version``,
``replaced_version``, ``requested_by``, ``promotion_reason`` and ``blocked_versions``. In the
registry: the alias move, recorded like every move (see ``steps.mlflow_io.registry``) with action
``promote``, who asked and why. So that the choice sticks, every version the promotion rule would
otherwise hand ``prod`` back to at the next evaluation gets the version tag ``prod_blocked``
(blocked versions never take ``prod`` on their own again; promoting one by hand unblocks it, and
removes the ``prod_ineligible`` mark of a version a branch's evaluation registered). A
newly evaluated model that beats the chosen version still takes ``prod`` as usual.

``python -m steps.promote history`` (``make prod-history``) prints every move of ``prod``, oldest first.
"""

from __future__ import annotations

import logging
import sys

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.core.errors import ModelError, PipelineError
from steps.mlflow_io import registry
from steps.mlflow_io.records import log_config
from steps.mlflow_io.registry import alias_version
from steps.mlflow_io.runs import stage_run
from steps.served import provenance

logger = logging.getLogger(__name__)


def parse_version(text: str) -> str:
    if not text.strip().isdigit() or int(text) < 1:
        raise PipelineError(
            f"parameter version: expected a version number of the production model (1, 2, ...), got {text!r}"
        )
    return str(int(text))


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
    if registry.parse_acc(tags.get(contract.VERSION_TAG_ACC)) is None or not tags.get(contract.VERSION_TAG_TEST_DIGEST):
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


def promote(config: Config, version: str, reason: str) -> str | None:
    """Point ``prod`` at ``version`` and record who and why; return the promote run's ID (None: nothing to do)."""
    version = parse_version(version)
    if not reason.strip():
        raise PipelineError('parameter reason: say why, e.g. -P reason="version 7 misses cracks on line 2"')
    client = mlflow.MlflowClient()
    reg = config.registry
    target = check_promotable(client, config, version)
    current = alias_version(reg.production, reg.alias)
    prod = f"{reg.production}@{reg.alias}"
    if current == version and contract.VERSION_TAG_BLOCKED not in target.tags:
        print(f"{prod} is already version {version}; nothing to do")
        return None

    digest = target.tags[contract.VERSION_TAG_TEST_DIGEST]
    who = registry.requested_by()
    with stage_run(contract.STAGE_PROMOTE, config.experiment) as run:
        log_config(config)
        # Chosen by hand, on the record: neither a block nor a branch's mark keeps it from prod now.
        for mark in (contract.VERSION_TAG_BLOCKED, contract.VERSION_TAG_INELIGIBLE):
            if mark in target.tags:
                client.delete_model_version_tag(reg.production, version, mark)
        # Block first, then move: an evaluation settling in between then finds nothing to hand
        # prod back to. Then read the alias again: a newer, better model may still take it.
        note = f"passed over by {who} in promote run {run.info.run_id}: {reason}"
        blocked = registry.pin(client, reg, version, digest, config.evaluate.min_improvement, note)
        registry.move_alias(client, reg, version, current, "promote", reason, run.info.run_id)
        blocked += keep_unblocked(client, config, version, digest, note)
        mlflow.set_tags(
            {
                contract.TAG_PROMOTED_VERSION: version,
                contract.TAG_REPLACED_VERSION: current or "",
                contract.TAG_REQUESTED_BY: who,
                contract.TAG_PROMOTION_REASON: reason,
                contract.TAG_BLOCKED_VERSIONS: ",".join(blocked),
            }
        )
    blocked_note = f"; blocked from automatic promotion: {', '.join(blocked)}" if blocked else ""
    print(f"{prod}: version {current} -> {version} by {who}: {reason}{blocked_note}")
    return run.info.run_id


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


def history(config: Config) -> list[dict]:
    """Print every recorded move of ``prod``, oldest first; return them."""
    events = registry.history(mlflow.MlflowClient(), config.registry)
    print(registry.format_history(events, config.registry.production, config.registry.alias))
    return events


OVERRIDES = parameters.overrides("promote")

if __name__ == "__main__":
    if sys.argv[1:2] == ["history"]:
        cli.main(history, "Print every move of the prod alias, oldest first.", {}, argv=sys.argv[2:])
    elif sys.argv[1:2] == ["verify"]:
        cli.main(verify_registered, "Check and tag the files of every registered version.", {}, argv=sys.argv[2:])
    else:
        cli.main(
            promote,
            "Move the prod alias to a chosen version (a rollback), recording who asked and why.",
            OVERRIDES,
            own=parameters.own("promote"),
        )
