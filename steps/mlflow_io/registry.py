"""Who holds ``prod``, in the registry: reading every version's score, and moving the alias by the rule
(``steps.mlflow_io.rule``) so that it ends right under concurrency, with its history.

Every alias move (``move_alias``) is recorded three ways, so nobody needs this code to audit it:

- a registered-model tag ``<alias>.history.<ns since epoch>.<random>`` holding a JSON event
  (``at``, ``from``, ``to``, ``action``, ``by``, ``run_id``, ``reason``): append-only, because every
  event has its own key, so concurrent writers never overwrite each other;
- on the new holder the version tags ``prod_since`` and ``replaced_version``;
- on the old holder the version tag ``prod_until``.

MLflow has no compare-and-set for aliases, so ``settle`` checks the holder is unchanged just before
it writes, re-reads after every move and decides again until the holder is one the rule keeps.
Whatever the interleaving of several processes, the last one to write has then seen every
registered version, so the alias ends on the rule's choice. A write can still land on a holder
that changed in the milliseconds after that check; its event's ``from`` is then the holder the
writer saw, and the next event puts the alias right. A holder ``settle`` wrote itself has no margin
to defend: it may have replaced a better version unseen, so the best version takes ``prod`` back
from it by any gain (``min_improvement`` protects only a holder the process found in place).

A version registered by an evaluation that was not to promote (``evaluate.promote`` false: CI on
a branch) carries ``prod_ineligible`` and is never chosen either. Only finished evaluations count:
a version whose ``eval_run_id`` run is not FINISHED (killed, failed, or still running in another
process, which settles it itself) never takes ``prod`` from ``settle``. Each move is recorded
before it is made (``state`` ``intended``) and marked ``done`` after, so a process killed between
the two leaves a record that says so, never a silent move.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, NamedTuple

import mlflow

from steps.core import contract
from steps.core.config import RegistryConfig
from steps.core.errors import PipelineError, StoreError, first_line
from steps.mlflow_io import mlflow_errors
from steps.mlflow_io.rule import (
    Scored,
    decide,
    history_events,
    history_key,
    retake,
    score_on,
    score_tag,
)

logger = logging.getLogger(__name__)

# Rounds of read-decide-write before giving up: concurrent evaluations on one test set settle in two
# or three; only evaluations on different test sets can pull the alias back and forth for ever.
MAX_ROUNDS = 12


def requested_by() -> str:
    """Who is acting: the tracking user when there is one, else the login name."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary UID in a container
        return "unknown"


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, as a string (MLflow returns int or str by call), or None when
    the model or the alias does not exist. Any other error (a store that does not answer) is a
    ``PipelineError``: read as "no holder", it would hand the alias to any challenger."""
    try:
        # Retried like a write: SQLite answers "database is locked" while another process writes.
        return str(_retried(mlflow.MlflowClient().get_model_version_by_alias, name, alias).version)
    except mlflow.exceptions.MlflowException as err:
        if mlflow_errors.missing(err) or mlflow_errors.alias_not_found(err):  # no model, or no such alias
            return None
        raise StoreError(
            f"cannot read {name}@{alias} ({first_line(err)}); nothing was changed, rerun when the store answers"
        ) from None


def _retried(call: Callable[..., Any], *args: Any) -> Any:
    """One registry call, retried when it collided with another process's write (tag and alias writes
    are a read and then an insert or update, so two processes writing the same key at once can collide)."""
    for attempt in range(5):
        try:
            return call(*args)
        except mlflow.exceptions.MlflowException as err:
            if attempt == 4 or not mlflow_errors.write_race(err):
                raise
            logger.debug("registry call collided with another process; retrying: %s", err)
            time.sleep(0.05 * (attempt + 1))


def read_versions(client: mlflow.MlflowClient, name: str, digest: str, own_run: str | None = None) -> list[Scored]:
    """Every version of ``name`` with its score on ``digest`` (versions as strings: MLflow returns int or str).

    A version whose ``eval_run_id`` run is not FINISHED is ``unfinished``, unless that run is
    ``own_run``, the evaluation asking, which is still open while it settles.
    """
    found: list[Scored] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        for v in page:
            eval_run = v.tags.get(contract.VERSION_TAG_EVAL_RUN_ID) or ""
            unfinished = bool(eval_run) and eval_run != own_run and _run_status(client, eval_run) != "FINISHED"
            blocked = contract.VERSION_TAG_BLOCKED in v.tags
            ineligible = contract.VERSION_TAG_INELIGIBLE in v.tags
            pruned = contract.VERSION_TAG_PRUNED in v.tags
            found.append(Scored(str(v.version), score_on(v.tags, digest), blocked, unfinished, ineligible, pruned))
        token = page.token
        if not token:
            return found


# Ended runs keep their status: read each once per process.
_ENDED: dict[str, str] = {}


def _run_status(client: mlflow.MlflowClient, run_id: str) -> str:
    """A run's status; ``MISSING`` for a run this store does not have."""
    if run_id not in _ENDED:
        try:
            status = client.get_run(run_id).info.status
        except mlflow.exceptions.MlflowException as err:
            if not mlflow_errors.missing(err):
                raise
            status = "MISSING"
        if status not in ("FINISHED", "FAILED", "KILLED"):
            return status
        _ENDED[run_id] = status
    return _ENDED[run_id]


def score_tags(acc: float, digest: str) -> dict[str, str]:
    """A version's tags for its score on test set ``digest``: ``acc.<digest>`` keeps it beside earlier
    ones, ``acc`` and ``test_digest`` say the latest."""
    value = repr(acc)  # repr: float(tag) == the metric, exactly
    return {score_tag(digest): value, contract.VERSION_TAG_ACC: value, contract.VERSION_TAG_TEST_DIGEST: digest}


def record_score(client: mlflow.MlflowClient, name: str, version: str, acc: float, digest: str) -> None:
    """Record a version's score on test set ``digest`` (``score_tags``)."""
    for key, value in score_tags(acc, digest).items():
        _retried(client.set_model_version_tag, name, version, key, value)


def move_alias(
    client: mlflow.MlflowClient,
    registry: RegistryConfig,
    to: str,
    came_from: str | None,
    action: str,
    reason: str,
    run_id: str | None,
) -> dict[str, Any]:
    """Record the move as intended, point the alias at ``to``, mark the record done; return the event."""
    name, alias = registry.production, registry.alias
    ns = time.time_ns()
    at = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")
    event: dict[str, Any] = {
        "at": at,
        "from": came_from,
        "to": to,
        "action": action,
        "by": requested_by(),
        "run_id": run_id,
        "reason": reason,
        "state": "intended",
    }
    key = history_key(alias, ns, secrets.token_hex(3))
    # Record first: a process killed between these writes leaves "intended", never an unrecorded move.
    _retried(client.set_registered_model_tag, name, key, json.dumps(event))
    _retried(client.set_registered_model_alias, name, alias, to)
    # The move's time orders the history (history_events): taken after the write returned, and kept
    # only if the alias still points at ``to`` when read after that. Otherwise another process's
    # write landed after this one, yet its clock may read earlier than this one's (a slow reply
    # from a busy server), so this move keeps the time taken before its write, which is earlier
    # than any later write. Either way the current holder's own move sorts last.
    done = time.time_ns()
    if alias_version(name, alias) != to:
        done = ns
    at = datetime.fromtimestamp(done / 1e9, tz=timezone.utc).isoformat(timespec="milliseconds")
    event.update({"state": "done", "at": at, "ns": done})
    _retried(client.set_registered_model_tag, name, key, json.dumps(event))
    _retried(client.set_model_version_tag, name, to, contract.VERSION_TAG_PROD_SINCE, at)
    _retried(client.set_model_version_tag, name, to, contract.VERSION_TAG_REPLACED_VERSION, came_from or "")
    if came_from is not None and came_from != to:
        try:
            _retried(client.set_model_version_tag, name, came_from, contract.VERSION_TAG_PROD_UNTIL, at)
        except mlflow.exceptions.MlflowException:
            logger.warning("version %s, which held %s@%s, no longer exists", came_from, name, alias)
    logger.info("%s@%s: version %s -> %s (%s)", name, alias, came_from, to, reason)
    return event


class Settled(NamedTuple):
    """What ``settle`` saw: the holder before it started, the holder it left, and every version's score."""

    start: str | None
    holder: str | None
    versions: list[Scored]


def settle(
    client: mlflow.MlflowClient,
    registry: RegistryConfig,
    digest: str,
    min_improvement: float,
    *,
    run_id: str | None = None,
    rescore: Callable[[str], float | None] | None = None,
    verify: Callable[[str], object] | None = None,
    before_write: Callable[[], None] | None = None,
    candidates: set[str] | None = None,
) -> Settled:
    """Move the alias until the rule keeps its holder.

    ``rescore(version)`` scores a holder that has no score on ``digest`` yet (and records it), or
    returns None when it cannot; each version is tried once. ``verify(version)`` recomputes the
    check of a version's files (``steps.served.provenance.check_version``) before the alias moves to it: a
    version it refuses is passed over, as a blocked one is. ``before_write`` is a test hook: it
    runs in the window that no check can close, between the last read and the write. ``candidates``:
    the only versions that may take ``prod`` from the holder (``evaluate.promotion`` significant: the
    new version, when it beat the holder significantly; none otherwise); None, any version.
    """
    start: str | None = None
    tried: set[str] = set()
    wrote: set[str] = set()  # holders this call put on the alias itself
    trusted: set[str] = set()
    refused: set[str] = set()
    for round_no in range(MAX_ROUNDS):
        current = alias_version(registry.production, registry.alias)
        if round_no == 0:
            start = current
        versions = [
            dataclasses.replace(v, blocked=True)
            if v.version in refused or (candidates is not None and v.version not in candidates | {current})
            else v
            for v in read_versions(client, registry.production, digest, own_run=run_id)
        ]
        holder = next((v for v in versions if v.version == current), None)
        if rescore is not None and holder is not None and holder.acc is None and holder.version not in tried:
            tried.add(holder.version)
            logger.info("prod version %s has no score on test set %s: scoring it first", holder.version, digest)
            rescore(holder.version)
            continue  # read again: the score is recorded now, or the version stays unscored
        target, reason = decide(current, versions, min_improvement)
        if current is not None and current in wrote and (better := retake(current, versions)) is not None:
            target, reason = better
        if target is None or target == current:
            return Settled(start, current, versions)
        if verify is not None and target not in trusted:
            try:
                verify(target)
                trusted.add(target)
            except PipelineError as err:
                logger.warning("passing over version %s for %s: %s", target, registry.alias, err)
                refused.add(target)
                continue
        if alias_version(registry.production, registry.alias) != current:
            continue  # moved by someone else while we read: decide again on fresh data
        if before_write is not None:
            before_write()
        move_alias(client, registry, target, current, "evaluate", reason, run_id)
        wrote.add(target)
    raise PipelineError(
        f"{registry.production}@{registry.alias} kept moving for {MAX_ROUNDS} rounds: another evaluation on a "
        f"different test set is promoting at the same time; rerun when it has finished (this one scored test set "
        f"{digest})"
    )


def pin(
    client: mlflow.MlflowClient, registry: RegistryConfig, version: str, digest: str, min_improvement: float, note: str
) -> list[str]:
    """Block every version the rule would hand ``prod`` to instead of ``version``, so a manual choice sticks.

    Each blocked version gets the version tag ``prod_blocked`` (``note`` says who and why); return them.
    """
    blocked: list[str] = []
    while True:
        target, _ = decide(version, read_versions(client, registry.production, digest), min_improvement)
        if target is None or target == version:
            return blocked
        _retried(client.set_model_version_tag, registry.production, target, contract.VERSION_TAG_BLOCKED, note)
        blocked.append(target)


def history(client: mlflow.MlflowClient, registry: RegistryConfig) -> list[dict[str, Any]]:
    """The recorded moves of the alias, oldest first; empty when the model does not exist yet."""
    try:
        model = client.get_registered_model(registry.production)
    except mlflow.exceptions.MlflowException:
        return []
    return history_events(model.tags, registry.alias)
