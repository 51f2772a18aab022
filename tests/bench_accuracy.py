"""Benchmark: what moves test accuracy, next to what the training seed alone moves it by.

Run with ``make bench-accuracy`` or ``python tests/bench_accuracy.py --write``; ``--quick`` is a
smoke check on a tiny subset (one epoch at 32x32) that produces every figure. Every variant trains
exactly as ``train`` does (``steps.train.fit``: the same input pipeline, schedule and best-epoch
weights, chosen on validation accuracy) on the same training/validation split, and is then scored
once on the unseen test split at cut-off 0.5, the figure the registry's ``acc`` holds:

- every set of ``conf/hparams.yaml`` that ``train`` trains, at the pipeline's seed;
- the first set at two more training seeds (the split stays): the spread of the seed alone, which
  any other difference has to beat to mean something;
- the first set with twice its epochs (with its ``patience``, as ``-P epochs=`` would run it, and
  without early stopping), and at 1.5 times the image size: the changes people try first when a
  model falls short.

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
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import make_tiny_elpv, publish  # noqa: E402
from steps.config import Config, load_config  # noqa: E402
from steps.data import Sample, load_split, scan_split  # noqa: E402
from steps.dataset import eval_batches  # noqa: E402
from steps.model import resolve_precision  # noqa: E402
from steps.prepare import ensure_data  # noqa: E402
from steps.train import fit, split_train_val  # noqa: E402

BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


class Variant(NamedTuple):
    label: str
    hparam_set: str
    changes: dict[str, Any]  # fields of that HParams set
    size_factor: float = 1.0  # times train.image_size
    seed_offset: int = 0  # added to the training seed; the split keeps the pipeline's seed


def variants(config: Config) -> list[Variant]:
    names = list(config.selected_hparams())
    first = names[0]
    epochs = config.selected_hparams()[first].epochs
    return [
        *(Variant(f"set {name}", name, {}) for name in names),
        Variant(f"set {first}, training seed +1", first, {}, seed_offset=1),
        Variant(f"set {first}, training seed +2", first, {}, seed_offset=2),
        Variant(f"set {first}, {2 * epochs} epochs", first, {"epochs": 2 * epochs}),
        Variant(f"set {first}, {2 * epochs} epochs, no early stop", first, {"epochs": 2 * epochs, "patience": 0}),
        Variant(f"set {first}, 1.5x image size", first, {}, size_factor=1.5),
    ]


def expert_certainty(data_dir: Path, samples: list[Sample]) -> np.ndarray | None:
    """Per sample, whether the manifest's experts were sure (probability 0 or 1); None without one."""
    path = data_dir / "manifest.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    if not {"file", "probability"} <= set(frame.columns):
        return None
    probability = dict(zip(frame["file"], frame["probability"], strict=True))
    known = [probability.get(s.path.relative_to(data_dir).as_posix()) for s in samples]
    if any(p is None for p in known):
        return None
    return np.isin(np.array(known, float), (0.0, 1.0))


def accuracy(labels: np.ndarray, prob: np.ndarray, where: np.ndarray | None = None) -> float | None:
    """Accuracy at cut-off 0.5, over the images ``where`` selects (None: there are none)."""
    hits = (prob >= 0.5) == (labels == 1)
    if where is not None:
        hits = hits[where]
    return float(hits.mean()) if hits.size else None


def figure(value: float | None) -> str:
    return "no such image" if value is None else f"{value:.4f}"


def measure(config: Config) -> dict[str, Any]:
    """Train and score every variant of ``config``; the figures of the report."""
    data_dir = ensure_data(config)
    classes, seed, base = config.data.classes, config.seed, config.train.image_size
    train_samples = scan_split(data_dir, "train", classes)
    test_samples = scan_split(data_dir, "test", classes)
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def images(size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in loaded:  # decoded once per size (and cached on disk, as train and evaluate do)
            train_x, _, _ = load_split(train_samples, size, "train", skip_bad=False, cache=config.data.cache)
            test_x, _, _ = load_split(test_samples, size, "test", skip_bad=False, cache=config.data.cache)
            loaded[size] = train_x, test_x
        return loaded[size]

    fit_rows, val_rows = split_train_val(train_samples, config.data.val_fraction, seed)
    labels = np.array([s.label for s in train_samples], "float32")
    test_labels = np.array([s.label for s in test_samples], "float32")
    sure = expert_certainty(data_dir, test_samples)
    precision = resolve_precision(config.train.precision)
    rows = []
    for variant in variants(config):
        hp = dataclasses.replace(config.selected_hparams()[variant.hparam_set], **variant.changes)
        size = int(round(base * variant.size_factor))
        train_x, test_x = images(size)
        val_xy = (train_x[val_rows], labels[val_rows])
        started = time.perf_counter()
        model, best_epoch, epochs_run = fit(
            hp,
            size,
            seed + variant.seed_offset,
            precision,
            (train_x[fit_rows], labels[fit_rows]),
            val_xy,
            config.evaluate.batch_size,
        )
        seconds = time.perf_counter() - started
        val_prob = model.predict(eval_batches(*val_xy, config.evaluate.batch_size), verbose=0).reshape(-1)
        test_prob = model.predict(eval_batches(test_x, test_labels, config.evaluate.batch_size), verbose=0)
        test_prob = test_prob.reshape(-1)
        row = {
            "label": variant.label,
            "size": size,
            "epochs": hp.epochs,
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "seconds": seconds,
            "val_accuracy": accuracy(val_xy[1], val_prob),
            "test_accuracy": accuracy(test_labels, test_prob),
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
        "| variant | image size | epochs run (of) | best epoch | training time | validation accuracy | test accuracy |"
    )
    rule = "| --- | --- | --- | --- | --- | --- | --- |"
    if sure:
        header += " test, sure | test, unsure |"
        rule += " --- | --- |"
    lines += ["", header, rule]
    for r in result["rows"]:
        line = (
            f"| {r['label']} | {r['size']} | {r['epochs_run']} ({r['epochs']}) | {r['best_epoch']} "
            f"| {r['seconds']:.0f} s | {r['val_accuracy']:.4f} | **{r['test_accuracy']:.4f}** |"
        )
        if sure:
            line += f" {figure(r['test_sure'])} | {figure(r['test_unsure'])} |"
        lines.append(line)
    lines.append(END)
    return "\n".join(lines)


def bench_config(quick: bool, tmp: Path) -> Config:
    """The default configuration; ``quick``: a tiny real-image subset, one epoch at 32x32."""
    if not quick:
        return load_config()
    data = make_tiny_elpv(tmp / "data")
    return load_config({"data.dir": str(data), "train.image_size": "32", "train.epochs": "1", "data.cache": "false"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset (under a minute)")
    parser.add_argument("--write", action="store_true", help="replace the accuracy section of BENCHMARKS.md")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        result = measure(bench_config(options.quick, Path(tmp)))
    text = report(result, "make bench-accuracy" + (" ARGS=--quick" if options.quick else ""))
    publish(text, BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
