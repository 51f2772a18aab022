"""Unit: the ranking term of ``RankedCrossentropy`` (steps.network.model) against the formula, on hard and soft
targets, and its configuration's round trip."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from steps.network.model import RankedCrossentropy


def expected(targets: np.ndarray, probs: np.ndarray, weight: float) -> float:
    """The loss written out pair by pair: the cross-entropy's mean plus ``weight`` times the mean of
    softplus(logit_j - logit_i) over the pairs with target_i > target_j, each weighted by target_i - target_j."""
    crossentropy = float(keras.losses.BinaryCrossentropy()(targets, probs[:, None]))
    logits = np.log(probs) - np.log1p(-probs)
    total = norm = 0.0
    for i, high in enumerate(targets):
        for j, low in enumerate(targets):
            if high > low:
                total += (high - low) * np.log1p(np.exp(logits[j] - logits[i]))
                norm += high - low
    return crossentropy + weight * total / norm


@pytest.mark.parametrize(
    "targets",
    [np.array([1, 0, 1, 0, 0], "float32"), np.array([1, 2 / 3, 1 / 3, 0, 2 / 3], "float32")],
    ids=["folder labels", "soft labels"],
)
def test_the_ranking_term_is_the_weighted_mean_over_pairs_in_the_wrong_order(targets):
    probs = np.array([0.7, 0.4, 0.2, 0.55, 0.1], "float32")
    for weight in (0.0, 0.5, 2.0):
        got = float(RankedCrossentropy(weight)(targets, probs[:, None]))
        assert got == pytest.approx(expected(targets, probs, weight), rel=1e-5)


def test_scores_in_the_wrong_order_cost_more_than_the_same_scores_in_the_right_order():
    targets = np.array([1, 1, 0, 0], "float32")
    right, wrong = (
        np.array([[0.6], [0.55], [0.45], [0.4]], "float32"),
        np.array([[0.45], [0.4], [0.6], [0.55]], "float32"),
    )
    ranked, plain = RankedCrossentropy(1.0), RankedCrossentropy(0.0)
    # The cross-entropy alone already prefers the right order; the ranking term widens the gap.
    assert float(ranked(targets, wrong)) - float(ranked(targets, right)) > float(plain(targets, wrong)) - float(
        plain(targets, right)
    )


def test_a_batch_of_one_class_adds_no_ranking_term():
    targets, probs = np.ones(3, "float32"), np.array([[0.9], [0.2], [0.6]], "float32")
    assert float(RankedCrossentropy(5.0)(targets, probs)) == pytest.approx(
        float(RankedCrossentropy(0.0)(targets, probs))
    )


def test_the_loss_round_trips_through_keras_serialization():
    loss = RankedCrossentropy(0.5, label_smoothing=0.1)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, RankedCrossentropy)
    assert (again.rank_weight, again.label_smoothing) == (0.5, 0.1)
