"""Who holds ``prod``: the promotion rule, the alias move that stays right under concurrency, and its
history; and loading a registered model's network safely (``load_keras``, ``pipeline_model_problem``).

The rule (``decide``): only scores on one test set (one ``test_digest``) are compared. Among the
versions of ``Production_Reg`` scored on that set and not blocked, the best (highest ``acc``; ties
go to the earlier version) takes ``prod`` from the current holder when the holder has no score on
that set, or when it beats the holder by more than zero and by at least ``min_improvement``. A tie
keeps the holder. Versions without a usable score (registered by hand) never take ``prod``.

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
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import mlflow

from steps.core import contract
from steps.core.config import RegistryConfig
from steps.core.errors import ModelError, PipelineError, StoreError
from steps.mlflow_io.tracking import first_line
from steps.served.provenance import flavor_problem

logger = logging.getLogger(__name__)

# Accuracies are ratios of counts: differences like 0.7 - 0.65 land a hair under 0.05 in floating point.
EPSILON = 1e-9
# Rounds of read-decide-write before giving up: concurrent evaluations on one test set settle in two
# or three; only evaluations on different test sets can pull the alias back and forth for ever.
MAX_ROUNDS = 12


# --- Pure rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """A version as the rule sees it: its accuracy on the test set in question, if it has one."""

    version: str
    acc: float | None
    blocked: bool = False
    unfinished: bool = False  # its evaluation run did not finish
    ineligible: bool = False  # registered by an evaluation that was not to promote (evaluate.promote false)
    pruned: bool = False  # its files were deleted by a store's retention rule (steps.mlflow_io.store)

    @property
    def eligible(self) -> bool:
        return (
            self.acc is not None
            and not self.blocked
            and not self.unfinished
            and not self.ineligible
            and not self.pruned
        )


def parse_acc(value: str | None) -> float | None:
    """A version's ``acc`` tag as a number, or None when it is missing or not a finite number."""
    try:
        acc = float(value) if value is not None else None
    except ValueError:
        return None
    return acc if acc is not None and math.isfinite(acc) else None


def score_tag(digest: str) -> str:
    """The version tag holding a version's accuracy on one test set: ``acc.<test_digest>``."""
    return f"{contract.VERSION_TAG_ACC}.{digest}"


def score_on(tags: Mapping[str, str], digest: str) -> float | None:
    """A version's accuracy on the test set ``digest``: ``acc.<digest>``, else ``acc`` when ``test_digest`` matches."""
    if score_tag(digest) in tags:
        return parse_acc(tags[score_tag(digest)])
    if tags.get(contract.VERSION_TAG_TEST_DIGEST) == digest:
        return parse_acc(tags.get(contract.VERSION_TAG_ACC))
    return None


def judge(challenger: Scored, champion: Scored | None, min_improvement: float) -> tuple[bool, str]:
    """Does ``challenger`` take ``prod`` from ``champion`` (the holder, None if there is none)? And why."""
    if challenger.acc is None:
        return False, f"version {challenger.version} has no score on this test set"
    if challenger.blocked:
        return False, f"version {challenger.version} was rolled back and is blocked from automatic promotion"
    if challenger.unfinished:
        return False, f"version {challenger.version}'s evaluation run did not finish"
    if challenger.ineligible:
        return False, f"version {challenger.version} was registered without promotion (evaluate.promote false)"
    if challenger.pruned:
        return False, f"version {challenger.version}'s files were pruned by the store's retention rule"
    if champion is None:
        return True, f"version {challenger.version} (acc {challenger.acc:.4f}) is the first to hold prod"
    if champion.version == challenger.version:
        return True, f"version {challenger.version} (acc {challenger.acc:.4f}) already holds prod"
    if not champion.eligible:
        why = (
            "has no score on this test set"
            if champion.acc is None
            else "is blocked"
            if champion.blocked
            else "was registered without promotion"
            if champion.ineligible
            else "has had its files pruned"
            if champion.pruned
            else "has an evaluation run that did not finish"
        )
        return True, f"prod version {champion.version} {why}; version {challenger.version} (acc {challenger.acc:.4f})"
    assert champion.acc is not None
    gain = challenger.acc - champion.acc
    versus = f"version {challenger.version} (acc {challenger.acc:.4f}) against prod version {champion.version} " + (
        f"(acc {champion.acc:.4f}): {gain:+.4f}"
    )
    if gain <= EPSILON:
        return False, f"{versus}; {'a tie keeps' if abs(gain) <= EPSILON else 'not better than'} the champion"
    if gain < min_improvement - EPSILON:
        return False, f"{versus} is below min_improvement {min_improvement:.4f}"
    return True, f"{versus} >= min_improvement {min_improvement:.4f}"


def best_of(entries: Sequence[Scored]) -> Scored | None:
    """The eligible version with the highest accuracy; ties go to the earliest version."""
    eligible = [e for e in entries if e.eligible]
    if not eligible:
        return None
    return min(eligible, key=lambda e: (-(e.acc or 0.0), int(e.version)))


def decide(current: str | None, entries: Sequence[Scored], min_improvement: float) -> tuple[str | None, str]:
    """Which version should hold ``prod``, given the holder and every version's score on one test set."""
    by_version = {e.version: e for e in entries}
    champion = by_version.get(current) if current is not None else None
    if current is not None and champion is None:
        champion = Scored(current, None)  # the holder is not among the versions: treat it as unscored
    best = best_of(entries)
    if best is None:
        return current, "no version has a score on this test set"
    takes, reason = judge(best, champion, min_improvement)
    return (best.version if takes else current), reason


def retake(current: str, entries: Sequence[Scored]) -> tuple[str, str] | None:
    """For a holder this process wrote itself: ``(better version, why)`` when one beats it by any gain.

    Its check before writing cannot close the window in which another process moved ``prod`` to a
    better version; the write may have replaced that version, and the margin, meant to keep an
    established holder, must not keep this one.
    """
    by_version = {e.version: e for e in entries}
    best = best_of(entries)
    mine = by_version.get(current, Scored(current, None))
    if best is None or best.version == current:
        return None
    if mine.eligible and best.acc is not None and mine.acc is not None and best.acc - mine.acc <= EPSILON:
        return None
    mine_acc = "no score" if mine.acc is None else f"acc {mine.acc:.4f}"
    return best.version, (
        f"version {best.version} (acc {best.acc:.4f}) is better than version {current} ({mine_acc}), which "
        "this evaluation had just put on prod and which may have replaced it"
    )


# --- History -----------------------------------------------------------------------------


def history_prefix(alias: str) -> str:
    return f"{alias}.history."


def history_key(alias: str, ns: int, nonce: str) -> str:
    """Sortable by time: the nanoseconds are zero-padded; the nonce keeps simultaneous moves apart."""
    return f"{history_prefix(alias)}{ns:020d}.{nonce}"


def history_events(tags: Mapping[str, str], alias: str) -> list[dict[str, Any]]:
    """The recorded moves of ``alias``, oldest first; a tag that is not valid JSON is kept as text.

    Ordered by when each move was made (``ns``, written when it is marked done; ``move_alias`` says
    how it keeps the holder's move last), else by when it was intended (the key): of two processes,
    the one that intends first may move last.
    """
    timed = []
    for key in (k for k in tags if k.startswith(history_prefix(alias))):
        try:
            event = json.loads(tags[key])
        except json.JSONDecodeError:
            event = {"reason": tags[key]}
        event = event if isinstance(event, dict) else {"reason": str(event)}
        intended = key.removeprefix(history_prefix(alias)).split(".")[0]
        ns = event.get("ns") if isinstance(event.get("ns"), int) else int(intended) if intended.isdigit() else 0
        timed.append((ns, key, event))
    return [event for _, _, event in sorted(timed, key=lambda t: (t[0], t[1]))]


def format_history(events: Sequence[Mapping[str, Any]], name: str, alias: str) -> str:
    if not events:
        return f"{name}@{alias} has never moved"
    lines = [f"{name}@{alias}, oldest first:"]
    for e in events:
        came_from = e.get("from") or "-"
        # An event recorded as intended and never marked done: its process died around the move.
        unconfirmed = (
            " [intended, not confirmed: the process stopped around this move]" if e.get("state") == "intended" else ""
        )
        lines.append(
            f"{e.get('at', '?')}  {came_from:>4} -> {e.get('to', '?'):<4} {e.get('action', '?'):<9} "
            f"by {e.get('by', '?')}: {e.get('reason', '')}{unconfirmed}"
        )
    return "\n".join(lines)


def requested_by() -> str:
    """Who is acting: the tracking user when there is one, else the login name."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, e.g. an arbitrary UID in a container
        return "unknown"


# --- Loading a registered model ----------------------------------------------------------


def load_keras(model_uri: str):
    """The Keras network of a model in the configured store, with Keras's ``safe_mode`` on.

    Safe mode refuses a file that needs code to run to load (a ``Lambda`` layer's pickled
    bytecode): a model in the registry is data, never a program. Keras defaults to it; we insist.
    A served model (``steps.served.serving``) holds the network as an artifact, which is loaded on its
    own, so none of the model's logged code runs here; models logged before it are Keras models.
    Refused as well, before anything is loaded: a Keras model saved as a TensorFlow SavedModel
    (``tf.saved_model.load`` knows no safe mode) and a file named outside the model's directory.
    """
    import keras

    from steps.served.serving import KERAS_ARTIFACT

    flavors = mlflow.models.get_model_info(model_uri).flavors
    try:
        if "keras" in flavors:
            conf = flavors["keras"]
            if conf.get("save_exported_model"):
                raise ModelError(
                    f"refused to load {model_uri}: a Keras model saved as a TensorFlow SavedModel "
                    "(save_exported_model), which loads without Keras's safe_mode; register a .keras model"
                )
            _inside_model(model_uri, str(conf.get("data", "data")))
            return mlflow.keras.load_model(model_uri, load_model_kwargs={"safe_mode": True})
        path = model_artifact(
            model_uri, KERAS_ARTIFACT, "is not a model of this pipeline: it holds no Keras network", flavors
        )
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise ModelError(
            f"refused to load {model_uri}: it needs code execution to load (Keras safe_mode); "
            "register models built from the pipeline's own layers"
        ) from None


def model_artifact(model_uri: str, key: str, missing: str, flavors: dict | None = None) -> Path:
    """The local copy of a served model's artifact ``key`` (the Keras network, an export), after
    checking that the path its ``MLmodel`` gives stays inside the model; ``missing`` ends the error
    when the model has no such artifact."""
    if flavors is None:
        flavors = mlflow.models.get_model_info(model_uri).flavors
    artifact = flavors.get("python_function", {}).get("artifacts", {}).get(key, {}).get("path")
    if not artifact:
        raise ModelError(f"{model_uri} {missing}")
    _inside_model(model_uri, artifact)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)).resolve()
    if not (local / artifact).resolve().is_relative_to(local):  # a link inside that leads out
        raise ModelError(f"refused to load {model_uri}: its file {artifact!r} leads outside the model")
    return local / artifact


def _inside_model(model_uri: str, path: str) -> None:
    """Refuse an ``MLmodel`` path that is absolute or climbs out of the model's directory."""
    parts = PurePosixPath(path.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", path) or path.startswith("~"):
        raise ModelError(f"refused to load {model_uri}: its MLmodel names {path!r}, outside the model's directory")


def pipeline_model_problem(info) -> str | None:
    """Why a logged model is not one ``train`` logged (None when it is): its ``MLmodel`` must have
    this pipeline's layout: the served model's code, the Keras network as an artifact inside the
    model, and the metadata evaluate needs."""
    from steps.served.serving import KERAS_ARTIFACT

    pyfunc = (info.flavors or {}).get("python_function", {})
    wrong = flavor_problem(info.flavors or {})
    if wrong:
        return wrong
    artifact = pyfunc.get("artifacts", {}).get(KERAS_ARTIFACT, {}).get("path")
    if not artifact:
        return f"it holds no Keras network (artifact {KERAS_ARTIFACT})"
    try:
        _inside_model(info.model_uri, str(artifact))
    except ModelError as err:
        return str(err).split(": ", 1)[1]
    metadata = info.metadata or {}
    missing = [key for key in ("image_size", "classes") if key not in metadata]
    return f"its metadata has no {', '.join(missing)}" if missing else None


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, as a string (MLflow returns int or str by call), or None when
    the model or the alias does not exist. Any other error (a store that does not answer) is a
    ``PipelineError``: read as "no holder", it would hand the alias to any challenger."""
    try:
        # Retried like a write: SQLite answers "database is locked" while another process writes.
        return str(_retried(mlflow.MlflowClient().get_model_version_by_alias, name, alias).version)
    except mlflow.exceptions.MlflowException as err:
        # No model: RESOURCE_DOES_NOT_EXIST; a model without the alias: INVALID_PARAMETER_VALUE, "not found".
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
            err.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(err)
        ):
            return None
        raise StoreError(
            f"cannot read {name}@{alias} ({first_line(err)}); nothing was changed, rerun when the store answers"
        ) from None


# --- MLflow edge -------------------------------------------------------------------------

# Errors of a write that lost a race inside MLflow's SQL store: tag and alias writes are a read and
# then an insert or update, so two processes writing the same key at once can collide. Retried.
_RACE_ERRORS = ("UNIQUE constraint failed", "IntegrityError", "duplicate key value", "database is locked")


def _retried(call: Callable[..., Any], *args: Any) -> Any:
    """One registry call, retried when it collided with another process's write."""
    for attempt in range(5):
        try:
            return call(*args)
        except mlflow.exceptions.MlflowException as err:
            if attempt == 4 or not any(text in str(err) for text in _RACE_ERRORS):
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
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            status = "MISSING"
        if status not in ("FINISHED", "FAILED", "KILLED"):
            return status
        _ENDED[run_id] = status
    return _ENDED[run_id]


def record_score(client: mlflow.MlflowClient, name: str, version: str, acc: float, digest: str) -> None:
    """``acc`` and ``test_digest`` become this score; ``acc.<digest>`` keeps it beside earlier ones."""
    value = repr(acc)  # repr: float(tag) == the metric, exactly
    _retried(client.set_model_version_tag, name, version, score_tag(digest), value)
    _retried(client.set_model_version_tag, name, version, contract.VERSION_TAG_ACC, value)
    _retried(client.set_model_version_tag, name, version, contract.VERSION_TAG_TEST_DIGEST, digest)


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
) -> Settled:
    """Move the alias until the rule keeps its holder.

    ``rescore(version)`` scores a holder that has no score on ``digest`` yet (and records it), or
    returns None when it cannot; each version is tried once. ``verify(version)`` recomputes the
    check of a version's files (``steps.served.provenance.check_version``) before the alias moves to it: a
    version it refuses is passed over, as a blocked one is. ``before_write`` is a test hook: it
    runs in the window that no check can close, between the last read and the write.
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
            dataclasses.replace(v, blocked=True) if v.version in refused else v
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
