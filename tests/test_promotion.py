"""Unit and registry: where a model is registered and which version `prod` points at."""

from __future__ import annotations

import mlflow
import pytest

from steps import contract
from steps.config import load_config
from steps.evaluate import choose_registry, pick_champion, promote

REGISTRY = load_config().registry


@pytest.mark.unit
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


@pytest.mark.unit
def test_pick_champion_takes_the_highest_acc():
    assert pick_champion([("1", "0.7"), ("2", "0.9"), ("3", "0.8")], current="1") == "2"


@pytest.mark.unit
def test_pick_champion_tie_keeps_the_current_holder_else_the_earliest():
    assert pick_champion([("1", "0.8"), ("2", "0.8")], current="2") == "2"
    assert pick_champion([("1", "0.8"), ("2", "0.8")], current=None) == "1"
    assert pick_champion([("10", "0.8"), ("9", "0.8")], current=None) == "9"  # numeric, not text order


@pytest.mark.unit
def test_versions_without_a_usable_acc_never_win():
    assert pick_champion([("1", None), ("2", "high"), ("3", "nan"), ("4", "0.61")], current="1") == "4"
    assert pick_champion([("1", None)], current=None) is None
    assert pick_champion([], current=None) is None


def _version(client, acc: str | None) -> str:
    tags = {contract.VERSION_TAG_ACC: acc} if acc is not None else {}
    return str(client.create_model_version(REGISTRY.production, source="file:///nowhere", tags=tags).version)


@pytest.mark.unit
def test_promote_moves_prod_to_the_best_version_in_a_real_registry(store):
    client = mlflow.MlflowClient()
    client.create_registered_model(REGISTRY.production)
    alias_version = lambda: str(client.get_model_version_by_alias(REGISTRY.production, REGISTRY.alias).version)  # noqa: E731

    assert promote(client, REGISTRY) is None  # no versions: no alias, no error
    v1 = _version(client, "0.70")
    assert promote(client, REGISTRY) == v1 and alias_version() == v1
    _version(client, "0.65")
    assert promote(client, REGISTRY) == v1 and alias_version() == v1
    _version(client, None)  # registered by hand, unscored
    assert promote(client, REGISTRY) == v1 and alias_version() == v1
    v4 = _version(client, "0.80")
    assert promote(client, REGISTRY) == v4 and alias_version() == v4
    _version(client, "0.80")  # a tie keeps the current holder
    assert promote(client, REGISTRY) == v4 and alias_version() == v4


@pytest.mark.unit
def test_pick_best_takes_the_highest_val_accuracy_and_breaks_ties_on_val_loss():
    from steps.train import pick_best

    assert pick_best({"a": (0.70, 0.5), "b": (0.80, 0.9), "c": (0.75, 0.1)}) == "b"
    assert pick_best({"a": (0.80, 0.6), "b": (0.80, 0.4)}) == "b"
    with pytest.raises(ValueError, match="no training results"):
        pick_best({})


@pytest.mark.unit
def test_score_counts_defect_as_the_positive_class():
    import numpy as np

    from steps.evaluate import score

    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    prob = np.array([0.9, 0.8, 0.2, 0.6, 0.1, 0.1, 0.3, 0.4])
    metrics, confusion = score(y, prob)
    assert confusion == [[4, 1], [1, 2]]  # [true good, true defect] x [predicted good, predicted defect]
    assert metrics["test_accuracy"] == 6 / 8
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 2 / 3
    assert metrics["roc_auc"] == pytest.approx(12 / 15)  # 12 of 15 (defect, good) pairs ranked right
    assert "roc_auc" not in score(np.zeros(3, int), np.array([0.1, 0.2, 0.9]))[0]  # undefined for one class
