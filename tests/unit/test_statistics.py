"""Unit: intervals from confusion counts, the exact McNemar test on crafted predictions, and the operating
point a line sets (min_recall, min_precision) on crafted scores."""

from __future__ import annotations

import numpy as np
import pytest

from steps.core import contract
from steps.core.config import ConfigError
from steps.core.loader import load_config
from steps.network import statistics
from steps.network.scoring import operating_point
from steps.network.statistics import exact_p, mcnemar, significant_win

pytestmark = pytest.mark.unit

ACC = contract.METRIC_TEST_ACCURACY


def test_an_accuracy_near_088_on_656_images_is_known_to_about_0025_either_way():
    tn, fp, fn, tp = 446, 24, 57, 129  # 575 of 656 right: 0.8765, the default pipeline's test figures
    low, high = statistics.intervals(tn, fp, fn, tp)[ACC]
    assert low < 575 / 656 < high
    assert 0.02 < (high - low) / 2 < 0.03
    assert statistics.intervals(tn, fp, fn, tp) == statistics.intervals(tn, fp, fn, tp)  # a fixed seed


def test_every_figure_gets_an_interval_that_holds_its_value_and_narrows_with_more_images():
    small, large = statistics.intervals(45, 5, 10, 20), statistics.intervals(4500, 500, 1000, 2000)
    for name in statistics.FIGURES:
        value = float(statistics.figures(45, 5, 10, 20)[name])
        assert small[name][0] <= value <= small[name][1], name
        assert large[name][1] - large[name][0] < small[name][1] - small[name][0], name
    logged = statistics.interval_metrics((45, 5, 10, 20), prefix=contract.TUNED_PREFIX)
    assert set(logged) == {f"tuned_{n}{s}" for n in statistics.FIGURES for s in ("_ci_low", "_ci_high")}


def test_an_interval_from_counts_matches_a_bootstrap_over_the_images_themselves():
    rng = np.random.default_rng(1)
    y = np.array([0] * 400 + [1] * 200)
    right = rng.random(600) < 0.85
    pred = np.where(right, y, 1 - y)
    tn, fp, fn, tp = (int(np.sum((y == a) & (pred == b))) for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
    picks = rng.integers(0, 600, size=(4000, 600))
    direct = np.mean(y[picks] == pred[picks], axis=1)
    low, high = statistics.intervals(tn, fp, fn, tp)[ACC]
    assert abs(low - np.percentile(direct, 2.5)) < 0.005 and abs(high - np.percentile(direct, 97.5)) < 0.005


def crafted(only_challenger: int, only_holder: int, both_right: int = 500, both_wrong: int = 60):
    """Correctness of two models on the same images, with the discordant counts given."""
    challenger = [True] * only_challenger + [False] * only_holder + [True] * both_right + [False] * both_wrong
    holder = [False] * only_challenger + [True] * only_holder + [True] * both_right + [False] * both_wrong
    return np.array(challenger), np.array(holder)


def test_a_tie_is_no_win():
    result = mcnemar(*crafted(10, 10))
    assert (result.challenger_only, result.other_only, result.p_value) == (10, 10, 1.0)
    assert result.agree == 560 and not significant_win(result)


def test_a_clear_win_is_significant():
    result = mcnemar(*crafted(30, 5))
    assert result.p_value < 0.001 and significant_win(result)


def test_a_win_within_noise_is_not_significant():
    result = mcnemar(*crafted(14, 8))
    assert 0.05 < result.p_value < 0.5 and not significant_win(result)
    assert not significant_win(mcnemar(*crafted(5, 30)))  # a significant loss is no win either


def test_the_exact_p_value_is_the_two_sided_binomial():
    assert exact_p(5, 0) == 2 / 32  # five of five one way: 2 * 0.5**5
    assert exact_p(0, 0) == 1.0 and exact_p(1, 0) == 1.0
    assert exact_p(7, 3) == pytest.approx(2 * sum([1, 10, 45, 120]) / 1024)


def scores():
    """Twenty validation images: defects mostly high, good parts mostly low, some overlap."""
    y = np.array([1] * 8 + [0] * 12)
    prob = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.45, 0.35, 0.15, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.1, 0.1, 0.05,
                     0.05, 0.02, 0.01])  # fmt: skip
    return y, prob


def test_min_recall_keeps_recall_at_the_target_with_the_highest_precision():
    y, prob = scores()
    point = operating_point(y, prob, "min_recall:0.85")
    assert point.met and point.recall >= 0.85
    assert point.recall == 7 / 8 and point.precision == 7 / 10  # catches the 0.35 defect, not the 0.15 one
    assert point.cutoff < 0.35


def test_min_precision_keeps_precision_at_the_target_with_the_highest_recall():
    y, prob = scores()
    point = operating_point(y, prob, "min_precision:0.8")
    assert point.met and point.precision >= 0.8 and point.recall == 5 / 8  # 0.7 and above: five of eight


def test_max_false_alarm_flags_at_most_that_share_of_good_parts_with_the_highest_recall():
    y, prob = scores()

    def flagged_good(point) -> int:
        return int(np.sum((prob >= point.cutoff) & (y == 0)))

    tight = operating_point(y, prob, "max_false_alarm:0.1")  # at most 1 of the 12 good parts
    assert tight.met and flagged_good(tight) <= 1 and tight.recall == 5 / 8
    loose = operating_point(y, prob, "max_false_alarm:0.2")  # at most 2: the 0.45 defect is caught too
    assert loose.met and flagged_good(loose) == 2 and loose.recall == 6 / 8


def test_an_unreachable_target_keeps_the_closest_cut_off_and_says_it_was_not_met():
    y = np.array([1, 0, 1, 0])
    prob = np.array([0.9, 0.9, 0.2, 0.2])  # no cut-off separates them
    point = operating_point(y, prob, "min_precision:0.9")
    assert not point.met and point.precision == 0.5


@pytest.mark.parametrize(
    "spec", ["min_recall:1.5", "min_recall", "max_recall:0.9", "recall>=0.9", "min_precision:0", "max_false_alarm:x"]
)
def test_a_bad_operating_point_fails_with_a_clear_error(spec):
    with pytest.raises(ConfigError, match=r"^train\.threshold_objective: expected one of accuracy, balanced_accuracy"):
        load_config({"train.threshold_objective": spec})
    assert load_config({"train.threshold_objective": "min_recall:0.95"}).train.threshold_objective == "min_recall:0.95"


def test_a_promotion_other_than_highest_or_significant_is_refused():
    with pytest.raises(ConfigError, match=r"^evaluate\.promotion: expected one of highest, significant, got 'best'"):
        load_config({"evaluate.promotion": "best"})


def test_the_wilson_interval_is_sound_at_the_ends_and_brackets_the_rate():
    from steps.network.statistics import wilson_interval

    low, high = wilson_interval(0, 200)
    assert low == 0.0 and 0.015 < high < 0.02  # not the point [0, 0] of the normal approximation
    low, high = wilson_interval(10, 200)
    assert low < 0.05 < high and high - low < 0.07
    assert wilson_interval(0, 0) == (0.0, 1.0)
