"""Entry point ``promote``: move ``prod`` to a chosen version by hand (a rollback, or a pick), on the record.

Refused in one line, ``prod`` unchanged, for a version that cannot hold it
(``steps.mlflow_io.promotion.check_promotable``). So that the choice sticks, every version the rule
would hand ``prod`` back to is tagged ``prod_blocked``; a newly evaluated model that beats the chosen
version still takes ``prod`` as usual (docs/promotion.md). ``python -m steps.promote history``
(``make prod-history``) prints every move of ``prod``, oldest first; ``python -m steps.promote verify``
(``make verify-registry``) checks the files of versions registered before evaluate checked them.
Parameters: ``MLproject``.
"""

from __future__ import annotations

import logging
import sys

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.core.errors import PipelineError
from steps.mlflow_io import registry, rule
from steps.mlflow_io.promotion import check_promotable, keep_unblocked, verify_registered
from steps.mlflow_io.records import log_config
from steps.mlflow_io.registry import alias_version
from steps.mlflow_io.runs import name_run, stage_run

logger = logging.getLogger(__name__)


def parse_version(text: str) -> str:
    if not text.strip().isdigit() or int(text) < 1:
        raise PipelineError(
            f"parameter version: expected a version number of the production model (1, 2, ...), got {text!r}"
        )
    return str(int(text))


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
        name_run(f"promote v{version}")
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


def history(config: Config) -> list[dict]:
    """Print every recorded move of ``prod``, oldest first; return them."""
    events = registry.history(mlflow.MlflowClient(), config.registry)
    print(rule.format_history(events, config.registry.production, config.registry.alias))
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
