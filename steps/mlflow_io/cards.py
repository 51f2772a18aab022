"""What people read in MLflow's registry: each version's model card (its description, Markdown) and the
registered models' one-paragraph descriptions. ``model_card`` is pure; ``describe`` writes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow

from steps.core import contract
from steps.core.config import Config
from steps.network.statistics import Paired
from steps.served import serving


@dataclass(frozen=True)
class Card:
    """What evaluate knows of the version it registered."""

    model_run_id: str
    metadata: Mapping[str, Any]
    test_digest: str
    n_test: int
    metrics: Mapping[str, float]  # evaluate's, with their intervals
    paired: tuple[str, Paired] | None  # the holder of prod it was compared with, and how
    exports: Sequence[str]  # its export tags


FIGURES = (
    ("accuracy", contract.METRIC_TEST_ACCURACY),
    ("balanced accuracy", contract.METRIC_BALANCED_ACCURACY),
    ("precision (defect)", contract.METRIC_PRECISION),
    ("recall (defect)", contract.METRIC_RECALL),
    ("F1 (defect)", contract.METRIC_F1),
)


def _figure(metrics: Mapping[str, float], key: str) -> str:
    low, high = metrics.get(key + contract.CI_LOW_SUFFIX), metrics.get(key + contract.CI_HIGH_SUFFIX)
    span = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
    return f"{metrics[key]:.3f}{span}" if key in metrics else "n/a"


def model_card(card: Card, registered_model: str, version: str, promoted: bool, reason: str) -> str:
    """The version's description: data, recipe, test figures with 95% intervals at 0.5 and at its own
    cut-off, the operating point, the paired comparison with the holder of prod, and its exports."""
    meta, m = card.metadata, card.metrics
    cutoff = float(meta.get(serving.DECISION_THRESHOLD, serving.REFERENCE_CUTOFF))
    tuned = contract.TUNED_PREFIX
    rows = "\n".join(f"| {label} | {_figure(m, key)} | {_figure(m, tuned + key)} |" for label, key in FIGURES)
    lines = [
        f"**{registered_model} v{version}**: {'holds prod' if promoted else 'not promoted'}. {reason}",
        "",
        f"- Data: {card.n_test} test images, test set `{card.test_digest}`; "
        f"classes {list(meta.get(serving.CLASSES, []))}.",
        f"- Recipe: hyperparameter set `{meta.get('hparam_set', '?')}`, {meta.get(serving.IMAGE_SIZE, '?')} px, "
        f"train run `{card.model_run_id}`.",
        f"- Operating point: cut-off {cutoff:.4f} for `{meta.get(contract.META_THRESHOLD_OBJECTIVE, '?')}`"
        + (
            f" (validation precision {float(meta[contract.META_VAL_PRECISION]):.3f}, recall "
            f"{float(meta[contract.META_VAL_RECALL]):.3f}"
            + ("" if meta.get(contract.META_OBJECTIVE_MET, True) else "; target not met, closest kept")
            + ")"
            if contract.META_VAL_PRECISION in meta
            else ""
        )
        + ".",
        "",
        f"| test figure (95% interval) | at 0.5 | at {cutoff:.4f} |",
        "| --- | --- | --- |",
        rows,
        f"| ROC-AUC | {m.get(contract.METRIC_ROC_AUC, float('nan')):.3f} | |",
        "",
    ]
    if card.paired is not None:
        holder, p = card.paired
        lines.append(
            f"- Against prod version {holder} on the same images: {p.agree} of {p.n} alike, right only here "
            f"{p.challenger_only}, only there {p.other_only}; exact McNemar p = {p.p_value:.3g}."
        )
    lines.append(
        f"- Exports: {', '.join(e.removeprefix(contract.VERSION_TAG_EXPORT_PREFIX) for e in card.exports) or 'none'}."
    )
    return "\n".join(lines)


def registered_model_description(config: Config, name: str) -> str:
    if name == config.registry.production:
        return (
            f"Defect classifiers ({' vs '.join(config.data.classes)}) that reached test accuracy "
            f"{config.evaluate.threshold} or more, registered by this pipeline's evaluate. The alias "
            f"`{config.registry.alias}` names the version the production line loads; each version's "
            "description is its model card (test figures with 95% intervals, operating point, paired "
            "comparison with the holder of the alias)."
        )
    return (
        f"Defect classifiers ({' vs '.join(config.data.classes)}) that scored below the production threshold "
        f"({config.evaluate.threshold}): kept with their scores and model cards, never served."
    )


def describe(client: mlflow.MlflowClient, config: Config, outcome, card: Card) -> None:
    """Write the version's model card and, where it differs, its registered model's description."""
    name, version = outcome.registered_model, outcome.version
    client.update_model_version(name, version, model_card(card, name, version, outcome.promoted, outcome.reason))
    paragraph = registered_model_description(config, name)
    if client.get_registered_model(name).description != paragraph:
        client.update_registered_model(name, paragraph)
