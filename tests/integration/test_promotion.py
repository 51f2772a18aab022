"""Unit and registry: where a model is registered, which version `prod` points at, and its history.

The rules are pure functions; the registry tests use a real SQLite registry with versions created
directly (no model, no TensorFlow), so they take seconds.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.mlflow_io import registry, rule
from steps.mlflow_io.registration import Outcome, choose_registry, register_and_promote
from steps.mlflow_io.rule import Scored, decide, judge, score_on
from steps.promote import history, promote

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("unchecked_files")]  # versions without files
CONFIG = load_config({"experiment": "test"})
REGISTRY = CONFIG.registry
D1, D2 = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"


@pytest.mark.parametrize(
    ("accuracy", "threshold", "expected"),
    [
        (0.60, 0.60, "Production_Reg"),
        (0.5999, 0.60, "Testing_Reg"),
        (0.0, 0.0, "Production_Reg"),
        (0.99, 1.0, "Testing_Reg"),
        (1.0, 1.0, "Production_Reg"),
    ],
)
def test_choose_registry_uses_at_or_above_the_threshold(accuracy, threshold, expected):
    assert choose_registry(accuracy, threshold, REGISTRY) == expected


# --- The rule, pure ----------------------------------------------------------------------


def test_a_score_counts_only_on_the_test_set_it_was_measured_on():
    tags = {"acc": "0.8", "test_digest": D1}
    assert score_on(tags, D1) == 0.8
    assert score_on(tags, D2) is None  # never compared with scores on another test set
    rescored = {**tags, "acc": "0.7", "test_digest": D2, f"acc.{D2}": "0.7", f"acc.{D1}": "0.8"}
    assert score_on(rescored, D1) == 0.8 and score_on(rescored, D2) == 0.7
    assert score_on({"acc": "high", "test_digest": D1}, D1) is None
    assert score_on({"acc": "nan", "test_digest": D1}, D1) is None
    assert score_on({"acc": "0.9"}, D1) is None  # no test_digest: registered by hand


def test_versions_scored_on_another_test_set_are_never_compared():
    # Version 2 scored 0.95 on another test set: it does not count against 0.70 on this one.
    entries = [Scored("1", 0.70), Scored("2", None), Scored("3", 0.65)]
    assert decide("1", entries, 0.0)[0] == "1"
    assert decide(None, entries, 0.0)[0] == "1"


@pytest.mark.parametrize(
    ("champion", "challenger", "min_improvement", "takes"),
    [
        (0.75, 0.75, 0.0, False),  # a tie keeps the champion
        (0.75, 0.76, 0.0, True),  # any gain, with the default rule
        (0.75, 0.74, 0.0, False),
        (0.65, 0.70, 0.05, True),  # a gain of exactly min_improvement (0.7 - 0.65 < 0.05 in floats)
        (0.65, 0.69, 0.05, False),  # a gain below it
        (0.65, 0.65, 0.05, False),
    ],
)
def test_tie_and_minimum_improvement_rules(champion, challenger, min_improvement, takes):
    took, reason = judge(Scored("2", challenger), Scored("1", champion), min_improvement)
    assert took is takes
    assert f"{challenger:.4f}" in reason and f"{champion:.4f}" in reason  # the numbers compared
    target, _ = decide("1", [Scored("1", champion), Scored("2", challenger)], min_improvement)
    assert target == ("2" if takes else "1")


def test_tie_among_challengers_goes_to_the_earliest_and_a_scored_version_beats_an_unscored_holder():
    assert decide(None, [Scored("10", 0.8), Scored("9", 0.8)], 0.0)[0] == "9"  # numeric, not text order
    target, reason = decide("1", [Scored("1", None), Scored("2", 0.61)], 0.5)
    assert target == "2" and "prod version 1 has no score on this test set" in reason


def test_unscored_and_blocked_versions_never_take_prod():
    assert decide(None, [Scored("1", None), Scored("2", 0.99, blocked=True)], 0.0)[0] is None
    assert decide("3", [Scored("1", None), Scored("2", 0.99, blocked=True), Scored("3", 0.6)], 0.0)[0] == "3"


def test_history_events_sort_by_time_and_survive_a_tag_that_is_not_json():
    alias = "prod"
    tags = {
        rule.history_key(alias, 2_000, "b"): '{"to": "2", "from": "1"}',
        rule.history_key(alias, 10_000, "a"): "edited by hand",
        rule.history_key(alias, 1_000, "c"): '{"to": "1", "from": null}',
        "unrelated": "x",
    }
    events = rule.history_events(tags, alias)
    assert [e.get("to") for e in events] == ["1", "2", None]
    assert events[2]["reason"] == "edited by hand"
    assert "1 -> 2" in rule.format_history(events, "Production_Reg", alias)


# --- Scores and thresholds ---------------------------------------------------------------


def test_score_counts_defect_as_the_positive_class():
    from steps.network.scoring import score

    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.2, 0.6, 0.1, 0.1, 0.3, 0.4])
    metrics, confusion = score(y, prob)
    assert confusion == [[4, 1], [1, 2]]  # [true good, true defect] x [predicted good, predicted defect]
    assert metrics["test_accuracy"] == 6 / 8
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 2 / 3
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert metrics["roc_auc"] == pytest.approx(12 / 15)  # 12 of 15 (defect, good) pairs ranked right
    assert "roc_auc" not in score(np.zeros(3, int), np.array([0.1, 0.2, 0.9]))[0]  # undefined for one class
    assert score(y, prob, cutoff=0.15)[1] == [[2, 3], [0, 3]]


def test_tune_threshold_maximises_the_objective_on_validation_labels():
    from steps.network.scoring import objective, tune_threshold

    # Defects score 0.30-0.45, good cells 0.05-0.25: 0.5 calls everything good.
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    prob = np.array([0.30, 0.40, 0.45, 0.05, 0.10, 0.10, 0.15, 0.20, 0.22, 0.25])
    cutoff = tune_threshold(y, prob, "balanced_accuracy")
    assert cutoff == pytest.approx((0.25 + 0.30) / 2)  # between the classes, not on an image
    assert objective(y, prob >= cutoff, "balanced_accuracy") == 1.0
    assert objective(y, prob >= 0.5, "balanced_accuracy") == 0.5
    for name in ("accuracy", "f1"):
        assert objective(y, prob >= tune_threshold(y, prob, name), name) == 1.0
    assert tune_threshold(np.zeros(4, int), np.array([0.1, 0.6, 0.7, 0.9]), "accuracy") == 0.5  # one class
    assert tune_threshold(y, np.full(10, 0.5), "accuracy") == 0.5  # nothing to separate: keep 0.5
    with pytest.raises(ValueError, match="unknown objective 'recall'"):
        tune_threshold(y, prob, "recall")


def test_pick_best_takes_the_highest_val_accuracy_and_breaks_ties_on_val_loss():
    from steps.train import pick_best

    assert pick_best({"a": (0.70, 0.5), "b": (0.80, 0.9), "c": (0.75, 0.1)}) == "b"
    assert pick_best({"a": (0.80, 0.6), "b": (0.80, 0.4)}) == "b"
    with pytest.raises(ValueError, match="no training results"):
        pick_best({})


# --- A real registry ---------------------------------------------------------------------


def config(**overrides: str):
    return load_config({"experiment": "test", **overrides})


def register(acc: float, digest: str = D1, cfg=None) -> Outcome:
    """What evaluate does after scoring: register by the threshold, then settle prod."""
    return register_and_promote(mlflow.MlflowClient(), cfg or CONFIG, "file:///nowhere", acc, digest, {})


def holder() -> str | None:
    from steps.mlflow_io.registry import alias_version

    return alias_version(REGISTRY.production, REGISTRY.alias)


def by_hand(tags: dict[str, str]) -> str:
    client = mlflow.MlflowClient()
    return str(client.create_model_version(REGISTRY.production, "file:///by-hand", tags=tags).version)


def test_evaluate_promotes_by_the_rule_and_explains_each_decision(store):
    first = register(0.70)
    assert first.promoted and holder() == first.version and "first to hold prod" in first.reason
    tie = register(0.70)
    assert not tie.promoted and holder() == first.version and "a tie keeps the champion" in tie.reason
    assert tie.champion == first.version and tie.champion_acc == 0.70
    better = register(0.75)
    assert better.promoted and holder() == better.version and "+0.0500" in better.reason
    low = register(0.50)  # below the 0.60 floor
    assert low.registered_model == "Testing_Reg" and not low.promoted and holder() == better.version
    assert "below the threshold 0.6" in low.reason

    strict = config(**{"evaluate.min_improvement": "0.05"})
    small_gain = register(0.79, cfg=strict)
    assert not small_gain.promoted and "below min_improvement 0.0500" in small_gain.reason
    enough = register(0.80, cfg=strict)
    assert enough.promoted and holder() == enough.version


def test_hand_registered_versions_never_take_prod_and_never_crash_the_rule(store):
    client = mlflow.MlflowClient()
    client.create_registered_model(REGISTRY.production)
    by_hand({})
    by_hand({"acc": "0.99"})  # no test_digest
    by_hand({"test_digest": D1})  # no acc
    by_hand({"acc": "not a number", "test_digest": D1})
    scored = register(0.61)
    assert scored.promoted and holder() == scored.version

    # A hand-made version put on prod by hand is unscored: the next scored model replaces it.
    unscored = by_hand({})
    client.set_registered_model_alias(REGISTRY.production, REGISTRY.alias, unscored)
    challenger = register(0.62)
    assert challenger.promoted and "prod version" in challenger.reason and "no score" in challenger.reason


def test_a_champion_scored_on_another_test_set_is_rescored_before_any_comparison(store):
    champion = register(0.90, digest=D1)
    calls = []

    def rescore(version):  # what evaluate does: score the champion on today's test set, record it
        calls.append(version)
        registry.record_score(mlflow.MlflowClient(), REGISTRY.production, version, 0.70, D2)
        return 0.70

    client = mlflow.MlflowClient()
    challenger = register_and_promote(client, CONFIG, "file:///nowhere", 0.75, D2, {}, rescore=rescore)
    assert calls == [champion.version]  # 0.75 was never compared with 0.90 from the other test set
    assert challenger.promoted and challenger.champion_acc == 0.70
    tags = client.get_model_version(REGISTRY.production, champion.version).tags
    assert (tags["acc"], tags["test_digest"], tags[f"acc.{D1}"], tags[f"acc.{D2}"]) == ("0.7", D2, "0.9", "0.7")

    # A champion that cannot be scored on the new test set counts as unscored there.
    fails = register_and_promote(client, CONFIG, "file:///nowhere", 0.61, "c" * 16, {}, rescore=lambda v: None)
    assert fails.promoted


def test_settle_ends_on_the_best_version_after_a_stale_write(store):
    """A deterministic race: another evaluation registers a better model while this one decides."""
    first = register(0.70)
    client = mlflow.MlflowClient()
    mine = str(
        client.create_model_version(REGISTRY.production, "file:///a", tags={"acc": "0.80", "test_digest": D1}).version
    )
    injected = []

    def meanwhile():  # between this process's read and its write
        if not injected:
            injected.append(register(0.90))  # another evaluation, start to finish

    start, end, _ = registry.settle(client, REGISTRY, D1, 0.0, before_write=meanwhile)
    assert start == first.version
    assert end == holder() == injected[0].version  # not "mine", which this process decided on first
    moves = [(e["from"], e["to"]) for e in history(CONFIG)]
    # The other evaluation moved 1 -> 3; this one's stale write (it saw 1) put 2 on prod, then it
    # read again and moved prod back to the best.
    assert moves == [(None, first.version), (first.version, injected[0].version), (first.version, mine),
                     (mine, injected[0].version)]  # fmt: skip


def test_rollback_moves_prod_records_who_and_why_and_sticks(store, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    v1, v2, v3 = (register(acc).version for acc in (0.70, 0.80, 0.90))
    assert holder() == v3

    run_id = promote(CONFIG, v1, "v3 and v2 miss finger cracks on line 2")
    assert holder() == v1
    run = mlflow.get_run(run_id)
    assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == "promote/test"
    assert run.data.tags["promoted_version"] == v1 and run.data.tags["replaced_version"] == v3
    assert run.data.tags["requested_by"] == "alice" and run.data.tags["blocked_versions"] == f"{v3},{v2}"
    tags = {v: mlflow.MlflowClient().get_model_version(REGISTRY.production, v).tags for v in (v1, v2, v3)}
    assert tags[v1]["replaced_version"] == v3 and "prod_since" in tags[v1] and "prod_until" in tags[v3]
    assert "alice" in tags[v2]["prod_blocked"] and "finger cracks" in tags[v3]["prod_blocked"]

    # The next evaluation does not undo the rollback, but a model better than v1 still wins.
    assert not register(0.75, cfg=config(**{"evaluate.min_improvement": "0.1"})).promoted
    assert holder() == v1
    v5 = register(0.85).version
    assert holder() == v5

    # Promoting a blocked version by hand unblocks it.
    promote(CONFIG, v3, "line 2 fixed; v3 is back")
    assert holder() == v3 and "prod_blocked" not in mlflow.MlflowClient().get_model_version("Production_Reg", v3).tags

    capsys.readouterr()
    events = history(CONFIG)
    assert [(e["from"], e["to"], e["action"]) for e in events] == [
        (None, v1, "evaluate"),
        (v1, v2, "evaluate"),
        (v2, v3, "evaluate"),
        (v3, v1, "promote"),
        (v1, v5, "evaluate"),
        (v5, v3, "promote"),
    ]
    assert events[3]["by"] == "alice" and events[3]["reason"] == "v3 and v2 miss finger cracks on line 2"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "Production_Reg@prod, oldest first:" and len(printed) == 7


REFUSALS = [
    ("9", "Production_Reg has no version 9; it has versions 2, 1"),
    ("3", "Production_Reg has no version 3; Testing_Reg has a version 3, but it scored below the threshold"),
    ("x", "parameter version: expected a version number of the production model (1, 2, ...), got 'x'"),
    ("0", "parameter version: expected a version number"),
    ("-1", "parameter version: expected a version number"),
]


def test_promote_refuses_what_cannot_hold_prod_and_leaves_prod_alone(store):
    register(0.70)
    register(0.80)
    for _ in range(3):
        register(0.10)  # Testing_Reg versions 1-3
    before, moves = holder(), len(history(CONFIG))
    for version, message in REFUSALS:
        with pytest.raises(PipelineError) as err:
            promote(CONFIG, version, "because")
        assert str(err.value).startswith(message), version
        assert holder() == before and len(history(CONFIG)) == moves


def test_promote_refuses_an_unscored_version_and_an_empty_reason(store):
    register(0.70)
    unscored = by_hand({"acc": "0.95"})
    with pytest.raises(PipelineError, match=f"version {unscored} has no test score"):
        promote(CONFIG, unscored, "it looks good")
    with pytest.raises(PipelineError, match="reason: say why"):
        promote(CONFIG, "1", "  ")
    assert holder() == "1"


def test_a_non_promoting_evaluation_registers_a_winner_and_no_later_evaluation_hands_it_prod(store):
    """CI on a branch: the version and its scores are on record, prod stays; a later, weaker,
    promoting evaluation passes it over; promote can still choose it, on the record."""
    client = mlflow.MlflowClient()
    champion = register(0.70)
    branch = register(0.95, cfg=config(**{"evaluate.promote": "false"}))
    assert not branch.promoted and holder() == champion.version
    assert branch.reason.startswith(f"evaluate.promote is false: version {branch.version} (acc 0.9500) is registered")
    tags = client.get_model_version(REGISTRY.production, branch.version).tags
    assert tags["acc"] == "0.95" and "prod_ineligible" in tags
    weaker = register(0.80)
    assert weaker.promoted and holder() == weaker.version  # not the 0.95 of the branch
    promote(CONFIG, branch.version, "reviewed: the branch's model goes to the line")
    assert holder() == branch.version
    assert "prod_ineligible" not in client.get_model_version(REGISTRY.production, branch.version).tags
    assert not register(0.90).promoted  # prod now holds it by the rule too


# --- evaluate.promotion significant: a paired win over the holder, or prod stays ----------------


def paired_with(holder: str, only_new: int, only_holder: int):
    """A crafted comparison with ``holder`` on 600 images (560 alike)."""
    from steps.network.statistics import mcnemar

    agree = 600 - only_new - only_holder
    new = np.array([True] * only_new + [False] * only_holder + [True] * agree)
    old = np.array([False] * only_new + [True] * only_holder + [True] * agree)
    return holder, mcnemar(new, old)


def significant(acc: float, paired=None) -> Outcome:
    cfg = config(**{"evaluate.promotion": "significant"})
    return register_and_promote(mlflow.MlflowClient(), cfg, "file:///nowhere", acc, D1, {}, paired=paired)


def test_with_significant_promotion_the_first_version_takes_prod(store):
    assert significant(0.70).promoted and holder() == "1"


def test_with_significant_promotion_a_clear_win_over_the_holder_takes_prod(store):
    significant(0.70)
    clear = significant(0.75, paired_with("1", only_new=35, only_holder=5))
    assert clear.promoted and holder() == clear.version == "2"


def test_with_significant_promotion_a_win_within_noise_leaves_prod_and_says_why(store):
    significant(0.70)
    noise = significant(0.71, paired_with("1", only_new=14, only_holder=8))
    assert not noise.promoted and holder() == "1"
    assert noise.reason.startswith("not a significant win over prod version 1 (McNemar p 0.")
    assert "by acc alone: version 2 (acc 0.7100) against prod version 1" in noise.reason
    assert judge(Scored("2", 0.71), Scored("1", 0.70), 0.0)[0]  # the default rule would have moved prod


def test_with_significant_promotion_a_tie_or_a_missing_comparison_leaves_prod(store):
    significant(0.70)
    assert not significant(0.70, paired_with("1", only_new=10, only_holder=10)).promoted
    unpaired = significant(0.90)
    assert not unpaired.promoted and holder() == "1" and "no paired comparison with prod version 1" in unpaired.reason
    stale = significant(0.95, paired_with("7", only_new=90, only_holder=0))  # compared with another holder
    assert not stale.promoted and holder() == "1"
