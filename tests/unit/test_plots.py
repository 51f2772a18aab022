"""Unit: the evaluation figures (what people look at instead of reading metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from steps.network import plots

pytestmark = pytest.mark.unit
CLASSES = ("ok_front", "def_front")


def test_misclassified_shows_the_wrong_images_worst_first():
    images = np.stack([np.full((8, 8, 1), v, "float32") for v in (10, 20, 30, 40, 50)])
    y = np.array([1, 0, 1, 0, 1])
    prob = np.array([0.9, 0.6, 0.45, 0.95, 0.1])  # wrong: index 1 (0.6), 2 (0.45), 3 (0.95), 4 (0.1)
    fig = plots.misclassified(images, y, prob, CLASSES)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [
        "true ok_front\np(defect) 0.95",
        "true def_front\np(defect) 0.10",
        "true ok_front\np(defect) 0.60",
        "true def_front\np(defect) 0.45",
    ]
    assert titled[0].images[0].get_array()[0, 0] == 40  # the image itself, not a neighbour's
    plots.close(fig)


def test_misclassified_is_none_when_every_image_is_right():
    images = np.zeros((2, 8, 8, 1), "float32")
    assert plots.misclassified(images, np.array([0, 1]), np.array([0.2, 0.8]), CLASSES) is None


def test_curves_draw_roc_and_precision_recall_with_their_scores():
    y = np.array([1, 1, 0, 0])
    fig = plots.curves(y, np.array([0.9, 0.4, 0.6, 0.1]))
    legends = [ax.get_legend().get_texts()[0].get_text() for ax in fig.axes]
    assert legends == ["AUC 0.750", "AP 0.833"]
    plots.close(fig)
