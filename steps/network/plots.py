"""Figures for people to look at: how the model does on the test set, where it looks, and how a batch it
scores compares with its reference. Each returns a matplotlib figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from steps.core import contract  # noqa: E402
from steps.datasets.stored import Rows
from steps.network.scoring import score  # noqa: E402


def confusion(
    matrices: Mapping[str, list[list[int]]], classes: Sequence[str], captions: Mapping[str, str] | None = None
) -> Figure:
    """One confusion matrix per cut-off on the defect probability, side by side; under each, its caption
    (the figures with their intervals)."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.6 * len(matrices), 5), squeeze=False)
    for ax, (cutoff, matrix) in zip(axes[0], matrices.items(), strict=True):
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks([0, 1], labels=classes)
        ax.set_yticks([0, 1], labels=classes)
        ax.set_xlabel("predicted" + (f"\n\n{captions[cutoff]}" if captions and cutoff in captions else ""))
        ax.set_ylabel("true")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center")
        ax.set_title(f"test set, cut-off {cutoff}")
    fig.tight_layout()
    return fig


def curves(y_true: np.ndarray, prob: np.ndarray, cutoffs: Sequence[float] = (0.5,)) -> Figure:
    """ROC and precision-recall curves side by side, defect as the positive class, cut-offs marked."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(8, 4))
    fpr, tpr, _ = roc_curve(y_true, prob)
    roc.plot(fpr, tpr, label=f"AUC {roc_auc_score(y_true, prob):.3f}")
    roc.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate (defect recall)", title="ROC")
    precision, recall, _ = precision_recall_curve(y_true, prob)
    pr.plot(recall, precision, label=f"AP {average_precision_score(y_true, prob):.3f}")
    pr.axhline(y_true.mean(), linestyle=":", color="grey")  # what guessing "defect" always gives
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall")
    for cutoff in cutoffs:  # where the model actually operates on each curve
        metrics, ((tn, fp), _) = score(y_true, prob, cutoff)
        roc.plot(fp / max(tn + fp, 1), metrics[contract.METRIC_RECALL], "o")
        pr.plot(metrics[contract.METRIC_RECALL], metrics[contract.METRIC_PRECISION], "o", label=f"cut-off {cutoff:.3f}")
    for ax in (roc, pr):
        ax.legend(loc="lower right")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return fig


def misclassified(
    images: np.ndarray | Rows,
    y_true: np.ndarray,
    prob: np.ndarray,
    classes: Sequence[str],
    cutoff: float = 0.5,
    most: int = 16,
) -> Figure | None:
    """The most confidently wrong test images, worst first; None when nothing is wrong."""
    wrong = np.flatnonzero((prob >= cutoff).astype(int) != y_true)
    if wrong.size == 0:
        return None
    worst = wrong[np.argsort(-np.abs(prob[wrong] - y_true[wrong]))][:most]
    fig, axes = _image_grid(worst.size, (2.2, 2.4))
    for ax, i in zip(axes.ravel(), worst, strict=False):
        ax.imshow(images[i, :, :, 0], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {classes[int(y_true[i])]}\np(defect) {prob[i]:.2f}", fontsize=8)
    fig.suptitle(f"misclassified test images ({wrong.size}), worst first")
    fig.tight_layout()
    return fig


def _image_grid(n: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """Up to 4 columns of axes for ``n`` images, ``cell`` inches each, all with their frames off."""
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def close(fig: Figure) -> None:
    plt.close(fig)


def gradcam_grid(
    images: np.ndarray,
    heatmaps: np.ndarray,
    prob: Sequence[float],
    names: Sequence[str],
    threshold: float,
    title: str = "where the model sees a defect (Grad-CAM)",
) -> Figure:
    """Each image with its Grad-CAM heat map over it, in the order given; titled by file and probability."""
    fig, axes = _image_grid(len(images), (2.4, 2.9))
    for ax, image, heat, p, name in zip(axes.ravel(), images, heatmaps, prob, names, strict=False):
        ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        # Opacity follows the evidence, so the image stays visible where the network does not look.
        ax.imshow(heat, cmap="jet", alpha=0.6 * np.clip(heat, 0.0, 1.0), vmin=0, vmax=1)
        short = "/".join(name.replace("\\", "/").split("/")[-2:])  # class folder and file
        ax.set_title(f"{short}\np(defect) {p:.2f}", fontsize=7)
    fig.suptitle(f"{title}, cut-off {threshold:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


def drift_histograms(
    reference: Mapping[str, np.ndarray], batch: Mapping[str, np.ndarray], p_values: Mapping[str, float], alpha: float
) -> Figure:
    """Each feature the drift check compared: the batch's histogram over the reference's (each as a
    density, on the same bins), titled with its Holm-adjusted p-value; features in alert in red."""
    names = [n for n in reference if n in batch]
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        ref, new = np.asarray(reference[name], float), np.asarray(batch[name], float)
        low, high = float(min(ref.min(), new.min())), float(max(ref.max(), new.max()))
        bins = np.linspace(low, high if high > low else low + 1, 25)
        ax.hist(ref, bins=bins, density=True, alpha=0.5, color="tab:blue", label="reference (validation)")
        ax.hist(new, bins=bins, density=True, alpha=0.5, color="tab:orange", label="this batch")
        p = p_values.get(name, 1.0)
        ax.set_title(f"{name}: p {p:.2g}", fontsize=8, color="tab:red" if p < alpha else "black")
        ax.tick_params(labelsize=6)
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle(f"this batch ({len(next(iter(batch.values())))} images) over the model's reference", fontsize=9)
    fig.tight_layout()
    return fig
