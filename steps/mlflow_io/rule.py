"""The promotion rule, pure: which version should hold ``prod`` given every version's score on one test set
(``decide``), and the history of moves as the registry records them. No MLflow here.

Only scores on one test set (one ``test_digest``) are compared. Among the versions of
``Production_Reg`` scored on that set and eligible (not blocked, not registered without promotion,
not pruned, evaluated by a finished run), the best (highest ``acc``; ties go to the earlier version)
takes ``prod`` from the current holder when the holder has no score on that set, or when it beats the
holder by more than zero and by at least ``min_improvement``. A tie keeps the holder. Versions
without a usable score (registered by hand) never take ``prod``."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steps.core import contract

logger = logging.getLogger(__name__)


# Accuracies are ratios of counts: differences like 0.7 - 0.65 land a hair under 0.05 in floating point.
EPSILON = 1e-9


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
