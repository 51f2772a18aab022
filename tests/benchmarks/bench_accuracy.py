"""Benchmark: what moves test accuracy, next to what the training seed alone moves it by.

Run with ``make bench-accuracy`` or ``python tests/benchmarks/bench_accuracy.py --write``; ``--quick`` is a
smoke check on a tiny subset (one epoch at 32x32) that produces every figure. Every variant trains
exactly as ``train`` does (``steps.network.training.fit``: the same input pipeline, schedule and best-epoch
weights, chosen on validation accuracy) on the same training/validation split, and is then scored
once on the unseen test split at cut-off 0.5, the figure the registry's ``acc`` holds:

- every set that ``train`` trains (or ``--sets``), at the pipeline's seed;
- the first set at more training seeds (``--seeds``; the split stays): the spread of the seed
  alone, which any other difference has to beat to mean something;
- the best set trained from scratch (``small``), the bar the pretrained sets have to clear.

Beside test accuracy: balanced accuracy and defect recall (a missed defect is what costs a factory),
and test accuracy of the same weights averaged over the eight symmetric views of each image
(test-time augmentation, ``tta: dihedral``), whatever the set's own ``tta``.

Where ``<data_dir>/manifest.csv`` holds each image's expert defect ``probability`` (ELPV does:
0, 1/3, 2/3 or 1), test accuracy is also given apart for the images the experts were sure of (0 or
1) and unsure of. With ``--write`` the results replace the "accuracy" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import make_tiny_elpv, publish  # noqa: E402
from steps.core import contract  # noqa: E402
from steps.core.config import Config  # noqa: E402
from steps.core.loader import load_config  # noqa: E402
from steps.datasets.batches import eval_batches  # noqa: E402
from steps.datasets.data import Sample, expert_probabilities, load_split, scan_split  # noqa: E402
from steps.datasets.elpv import ensure_data  # noqa: E402
from steps.network.explain import unwrap  # noqa: E402
from steps.network.model import resolve_precision, with_tta  # noqa: E402
from steps.network.scoring import score  # noqa: E402
from steps.network.statistics import accuracy_interval  # noqa: E402
from steps.network.training import fit, split_train_val  # noqa: E402

BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


class Variant(NamedTuple):
    label: str
    hparam_set: str
    changes: dict[str, Any]  # fields of that HParams set
    seed_offset: int = 0  # added to the training seed; the split keeps the pipeline's seed


# The best network trained from scratch (issue 5's benchmark), the bar the pretrained sets must clear.
SCRATCH = "small"


def variants(config: Config, seeds: int, baseline: bool = True, soft: bool = False) -> list[Variant]:
    names = list(config.selected_hparams())
    first = names[0]
    rows = [Variant(f"set {name}", name, {}) for name in names]
    rows += [Variant(f"set {first}, training seed +{k}", first, {}, seed_offset=k) for k in range(1, seeds)]
    if soft:  # the same set trained on the experts' probabilities (soft_labels)
        rows.append(Variant(f"set {first}, soft labels", first, {"soft_labels": True}))
    if baseline and SCRATCH not in names and SCRATCH in config.hparam_sets:
        rows.append(Variant(f"from scratch: set {SCRATCH}", SCRATCH, {}))
    return rows


def expert_certainty(data_dir: Path, samples: list[Sample]) -> np.ndarray | None:
    """Per sample, whether the manifest's experts were sure (probability 0 or 1); None without one."""
    known = expert_probabilities(data_dir, samples)
    return None if known is None else np.isin(known, (0.0, 1.0))


def accuracy(labels: np.ndarray, prob: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Accuracy at cut-off 0.5, over the images ``where`` selects (None: there are none)."""
    hits = (prob >= 0.5) == (labels == 1)
    if where is not None:
        hits = hits[where]
    return float(hits.mean()) if hits.size else None


def figure(value: float | None) -> str:
    return "no such image" if value is None else f"{value:.4f}"


Images = Callable[[int], tuple[np.ndarray, np.ndarray]]


def split_images(config: Config) -> tuple[Path, list[Sample], list[Sample], Images]:
    """The data folder, its train and test samples, and their decoded images by size (each size decoded once)."""
    data_dir = ensure_data(config)
    train_samples = scan_split(data_dir, "train", config.data.classes)
    test_samples = scan_split(data_dir, "test", config.data.classes)
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def images(size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in loaded:  # cached on disk too, as train and evaluate do
            train_x, _, _ = load_split(train_samples, size, "train", skip_bad=False, cache=config.data.cache)
            test_x, _, _ = load_split(test_samples, size, "test", skip_bad=False, cache=config.data.cache)
            loaded[size] = train_x, test_x
        return loaded[size]

    return data_dir, train_samples, test_samples, images


def measure(config: Config, seeds: int, baseline: bool = True, soft: bool = False) -> dict[str, Any]:
    """Train and score every variant of ``config``; the figures of the report."""
    data_dir, train_samples, test_samples, images = split_images(config)
    seed = config.seed
    fit_rows, val_rows = split_train_val(train_samples, config.data.val_fraction, seed)
    labels = np.array([s.label for s in train_samples], "float32")
    test_labels = np.array([s.label for s in test_samples], "float32")
    sure = expert_certainty(data_dir, test_samples)
    precision = resolve_precision(config.train.precision)
    rows = []
    soft_targets = expert_probabilities(data_dir, train_samples)
    for variant in variants(config, seeds, baseline, soft):
        hp = config.hparam_sets[variant.hparam_set]
        overrides = {"epochs": config.train.epochs, "image_size": config.train.image_size}
        hp = dataclasses.replace(hp, **{k: v for k, v in overrides.items() if v is not None}, **variant.changes)
        size = hp.image_size
        train_x, test_x = images(size)
        val_xy = (train_x[val_rows], labels[val_rows])
        started = time.perf_counter()
        model, best_epoch, epochs_run = fit(
            hp,
            seed + variant.seed_offset,
            precision,
            (train_x[fit_rows], (soft_targets if hp.soft_labels and soft_targets is not None else labels)[fit_rows]),
            val_xy,
            config.evaluate.batch_size,
        )
        seconds = time.perf_counter() - started
        model = with_tta(model, hp)  # as train logs it: with the set's test-time augmentation
        val_prob = model.predict(eval_batches(*val_xy, config.evaluate.batch_size), verbose=0).reshape(-1)
        test_prob = model.predict(eval_batches(test_x, test_labels, config.evaluate.batch_size), verbose=0)
        test_prob = test_prob.reshape(-1)
        # The same weights averaged over the eight symmetric views, whatever the set's own tta.
        views = with_tta(unwrap(model), dataclasses.replace(hp, tta="dihedral"))
        tta_prob = views.predict(eval_batches(test_x, test_labels, config.evaluate.batch_size), verbose=0)
        row = {
            "label": variant.label,
            "size": size,
            "epochs": hp.epochs,
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "seconds": seconds,
            "val_accuracy": accuracy(val_xy[1], val_prob),
            "test_accuracy": accuracy(test_labels, test_prob),
            "balanced": score(test_labels, test_prob)[0][contract.METRIC_BALANCED_ACCURACY],
            "recall": score(test_labels, test_prob)[0][contract.METRIC_RECALL],
            "test_tta8": accuracy(test_labels, tta_prob.reshape(-1)),
        }
        if sure is not None:
            row["test_sure"] = accuracy(test_labels, test_prob, sure)
            row["test_unsure"] = accuracy(test_labels, test_prob, ~sure)
        rows.append(row)
    return {
        "n_fit": len(fit_rows),
        "n_val": len(val_rows),
        "n_test": len(test_samples),
        "n_sure": None if sure is None else int(sure.sum()),
        "majority": float(max(test_labels.mean(), 1 - test_labels.mean())),
        "rows": rows,
    }


def span(row: dict, result: dict) -> str:
    """The test accuracy's 95% interval (steps.network.statistics), from the count it stands for."""
    n = int(result["n_test"])
    low, high = accuracy_interval(round(row["test_accuracy"] * n), n)
    return f"[{low:.3f}, {high:.3f}]"


def report(result: dict[str, Any], command: str) -> str:
    sure = result["n_sure"] is not None
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"Each row trains on the same {result['n_fit']} images, keeps the epoch with the best accuracy on the same "
        f"{result['n_val']} validation images, and is scored once on the {result['n_test']} test images at "
        f"cut-off 0.5 (always answering the larger class scores {result['majority']:.4f}).",
    ]
    if sure:
        lines.append(
            f"Sure / unsure: test accuracy on the {result['n_sure']} images the experts labelled with probability "
            f"0 or 1, and on the {result['n_test'] - result['n_sure']} they gave 1/3 or 2/3."
        )
    header = (
        "| variant | image size | epochs run (of) | best epoch | training time | validation accuracy "
        "| test accuracy [95%] "
        "| balanced accuracy | defect recall | test accuracy, 8 views |"
    )
    rule = "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    if sure:
        header += " test, sure | test, unsure |"
        rule += " --- | --- |"
    lines += ["", header, rule]
    for r in result["rows"]:
        line = (
            f"| {r['label']} | {r['size']} | {r['epochs_run']} ({r['epochs']}) | {r['best_epoch']} "
            f"| {r['seconds']:.0f} s | {r['val_accuracy']:.4f} | **{r['test_accuracy']:.4f}** {span(r, result)} "
            f"| {r['balanced']:.4f} | {r['recall']:.4f} | {r['test_tta8']:.4f} |"
        )
        if sure:
            line += f" {figure(r['test_sure'])} | {figure(r['test_unsure'])} |"
        lines.append(line)
    lines.append(END)
    return "\n".join(lines)


def bench_config(quick: bool, tmp: Path, sets: str) -> Config:
    """The default configuration (or ``sets``); ``quick``: a tiny real-image subset, one epoch at 32x32."""
    chosen = {"train.hparams": sets} if sets else {}
    if not quick:
        return load_config(chosen)
    data = make_tiny_elpv(tmp / "data")
    return load_config(
        {**chosen, "data.dir": str(data), "train.image_size": "32", "train.epochs": "1", "data.cache": "false"}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset (under a minute)")
    parser.add_argument("--write", action="store_true", help="replace the accuracy section of BENCHMARKS.md")
    parser.add_argument("--sets", default="", help="comma-separated sets of conf/hparams.yaml (default: the pipeline)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the first set (default 3)")
    parser.add_argument("--no-baseline", action="store_true", help=f"leave out the from-scratch set {SCRATCH}")
    parser.add_argument("--soft", action="store_true", help="the first set again, trained on the experts' soft labels")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        config = bench_config(options.quick, Path(tmp), options.sets)
        result = measure(config, options.seeds, not options.no_baseline, options.soft)
    args = " ".join(a for a in sys.argv[1:] if a != "--write")
    text = report(result, "make bench-accuracy" + (f' ARGS="{args}"' if args else ""))
    publish(text, BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
