"""Benchmark: levers for a stronger default model, screened with one seed and confirmed with three.

Run with ``make bench-levers ARGS="..."`` or ``python tests/benchmarks/bench_levers.py``. Each
``--variant name:set=lite160,key=value,...`` is a set of conf/hparams.yaml with some of its fields
changed; each is trained at ``--seeds`` training seeds (or its own ``seeds=N``; the split keeps the
pipeline's seed) exactly as ``train`` trains (``steps.network.training.fit``), with the set's
test-time views, and its validation and test probabilities are kept in ``bench-out/levers/`` (one
file per variant and seed, named by what it trained, on which CPU): a rerun or a longer queue
reuses them. Without training: an ``--ensemble name:a+b+c`` is the mean of its members'
probabilities, and a ``--pick name:a+b+c`` is what ``train`` would ship from those candidates (the
highest validation accuracy, ties to the lower validation loss), seed by seed, over the seeds all
members have.

Per variant, at each seed and as the mean over seeds, on the unseen test images:

- accuracy at cut-off 0.5 (with its 95% interval), balanced accuracy, defect recall, ROC-AUC;
- at the cut-off chosen on validation for at least 85% defect recall (``min_recall:0.85``, as
  ``train.threshold_objective`` would choose it): test recall and precision there;
- the paired test (exact McNemar on the same test images) against the first variant at the same seed.

With ``--write`` the results replace the "levers" section of BENCHMARKS.md. ``--quick`` is a smoke
check on a tiny subset (one epoch at 32x32) that produces every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_accuracy import bench_config, expert_certainty, split_images  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402
from steps.core import contract  # noqa: E402
from steps.core.config import Config, HParams  # noqa: E402
from steps.datasets.batches import eval_batches  # noqa: E402
from steps.datasets.data import expert_probabilities  # noqa: E402
from steps.network.model import resolve_precision, with_tta  # noqa: E402
from steps.network.scoring import keras_loss_and_accuracy, operating_point, score  # noqa: E402
from steps.network.statistics import accuracy_interval, mcnemar  # noqa: E402
from steps.network.training import fit, pick_best, split_train_val, training_targets  # noqa: E402

BEGIN, END = "<!-- levers:begin -->", "<!-- levers:end -->"
CACHE = PROJECT_DIR / "bench-out" / "levers"
TARGET = "min_recall:0.85"


class Variant(NamedTuple):
    name: str
    hparam_set: str
    changes: dict[str, Any]
    seeds: int | None  # its own number of training seeds, else --seeds


def parse_variant(spec: str, config: Config) -> Variant:
    """``"soft:set=lite160,soft_labels=true,seeds=3"``: a set, the fields it changes (values read as
    YAML) and, optionally, its own number of training seeds."""
    name, _, body = spec.partition(":")
    pairs = [p.split("=", 1) for p in body.split(",") if p.strip()]
    if not name or any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--variant expects name:set=SET,field=value,..., got {spec!r}")
    changes = {k.strip(): yaml.safe_load(v) for k, v in pairs}
    hparam_set = str(changes.pop("set", next(iter(config.selected_hparams()))))
    seeds = changes.pop("seeds", None)
    if seeds is not None and (not isinstance(seeds, int) or seeds < 1):
        raise SystemExit(f"--variant {name}: seeds must be an integer >= 1, got {seeds!r}")
    if hparam_set not in config.hparam_sets:
        raise SystemExit(f"--variant {name}: no set {hparam_set!r} in conf/hparams.yaml")
    unknown = set(changes) - {f.name for f in dataclasses.fields(HParams)}
    if unknown:
        raise SystemExit(f"--variant {name}: HParams has no field {', '.join(sorted(unknown))}")
    return Variant(name, hparam_set, changes, seeds)


def parse_group(spec: str, names: list[str], option: str = "--ensemble") -> tuple[str, list[str]]:
    """``"soft3:a+b+c"``: a name and two or more of ``names``."""
    name, _, body = spec.partition(":")
    members = [m.strip() for m in body.split("+") if m.strip()]
    missing = [m for m in members if m not in names]
    if not name or len(members) < 2 or missing:
        raise SystemExit(f"{option} expects name:a+b[+c...] of {names}, got {spec!r}")
    return name, members


def pick(runs: dict[str, list[dict[str, Any]]], members: list[str], val_labels: np.ndarray, k: int) -> str:
    """The member ``train`` would ship at seed ``k``: ``pick_best`` on validation accuracy and loss."""
    scored = {m: keras_loss_and_accuracy(val_labels, runs[m][k]["val_prob"], 0.0) for m in members}
    return pick_best({m: (accuracy, loss) for m, (loss, accuracy) in scored.items()})


def cache_file(hp: HParams, seed: int, data_key: str) -> Path:
    """Where one training's probabilities are kept: named by everything that decides them. Of the set, the
    fields that differ from ``HParams``' defaults, so that a field added later leaves the names as they were."""
    defaults = {f.name: f.default for f in dataclasses.fields(HParams) if f.default is not dataclasses.MISSING}
    fields = {k: v for k, v in dataclasses.asdict(hp).items() if k not in defaults or v != defaults[k]}
    key = json.dumps([fields, seed, data_key, machine()], sort_keys=True, default=str)
    return CACHE / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def train_or_load(hp: HParams, seed: int, config: Config, data: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The validation and test probabilities of ``hp`` trained at ``seed``, from the cache if there."""
    path = cache_file(hp, seed, data["key"])
    if path.exists() and not quick:
        kept = np.load(path)
        return {k: kept[k] for k in kept.files} | {"cached": True}
    train_x, test_x = data["images"](hp.image_size)
    fit_rows, val_rows = data["fit_rows"], data["val_rows"]
    targets = training_targets(hp, data["labels"], data["soft"])
    val_xy = (train_x[val_rows], data["labels"][val_rows])
    started = time.perf_counter()
    model, best_epoch, epochs_run = fit(
        hp, seed, data["precision"], (train_x[fit_rows], targets[fit_rows]), val_xy, config.evaluate.batch_size
    )
    seconds = time.perf_counter() - started
    model = with_tta(model, hp)
    batch = config.evaluate.batch_size
    result = {
        "val_prob": model.predict(eval_batches(*val_xy, batch), verbose=0).reshape(-1),
        "test_prob": model.predict(eval_batches(test_x, data["test_labels"], batch), verbose=0).reshape(-1),
        "seconds": np.float64(seconds),
        "best_epoch": np.int64(best_epoch),
        "epochs_run": np.int64(epochs_run),
    }
    if not quick:
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(path, **result)
    return result | {"cached": False}


def figures(
    labels: np.ndarray, val_labels: np.ndarray, run: dict[str, Any], sure: np.ndarray | None
) -> dict[str, float]:
    """The test figures of one trained model (or ensemble). ``sure``: per test image, whether the experts
    gave it probability 0 or 1 (None: the data has no manifest)."""
    at_half, _ = score(labels, run["test_prob"])
    point = operating_point(val_labels, run["val_prob"], TARGET)
    at_point, _ = score(labels, run["test_prob"], point.cutoff)
    called, good = run["test_prob"] >= point.cutoff, labels == 0
    where_errors = {}
    if sure is not None:
        # At that cut-off: the false alarms on the cells the experts were sure were good and on those they
        # gave 1/3, and the precision and recall on the sure cells alone.
        found = called[sure & ~good].sum()
        where_errors = {
            "alarms_sure": float((called & good & sure).sum()),
            "alarms_unsure": float((called & good & ~sure).sum()),
            "sure_precision": float(found / max(called[sure].sum(), 1)),
            "sure_recall": float(found / max((sure & ~good).sum(), 1)),
        }
    return where_errors | {
        "accuracy": at_half[contract.METRIC_TEST_ACCURACY],
        "balanced": at_half[contract.METRIC_BALANCED_ACCURACY],
        "recall": at_half[contract.METRIC_RECALL],
        "roc_auc": at_half.get(contract.METRIC_ROC_AUC, float("nan")),
        "cutoff": point.cutoff,
        "recall_at": at_point[contract.METRIC_RECALL],
        "precision_at": at_point[contract.METRIC_PRECISION],
    }


def load_data(config: Config) -> dict[str, Any]:
    data_dir, train_samples, test_samples, images = split_images(config)
    seed = config.seed
    fit_rows, val_rows = split_train_val(train_samples, config.data.val_fraction, seed)
    labels = np.array([s.label for s in train_samples], "float32")
    names = [str(s.path.relative_to(data_dir)) for s in (*train_samples, *test_samples)]
    return {
        "images": images,
        "fit_rows": fit_rows,
        "val_rows": val_rows,
        "labels": labels,
        "soft": expert_probabilities(data_dir, train_samples),
        "test_labels": np.array([s.label for s in test_samples], "float32"),
        "sure": expert_certainty(data_dir, test_samples),
        "precision": resolve_precision(config.train.precision),
        "key": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16] + f"-{seed}-{fit_rows[:5]}",
    }


def measure(
    config: Config, specs: list[str], ensembles: list[str], picks: list[str], seeds: int, quick: bool
) -> dict[str, Any]:
    variants = [parse_variant(s, config) for s in specs]
    names = [v.name for v in variants]
    groups = [parse_group(e, names) for e in ensembles]
    choices = [parse_group(p, names + [g for g, _ in groups], "--pick") for p in picks]
    data = load_data(config)
    labels, val_labels = data["test_labels"], data["labels"][data["val_rows"]]
    runs: dict[str, list[dict[str, Any]]] = {}
    overrides = {"epochs": config.train.epochs, "image_size": config.train.image_size}
    for k in range(max(v.seeds or seeds for v in variants)):  # seed by seed: a stopped queue has every first seed
        for v in variants:
            if k >= (v.seeds or seeds):
                continue
            hp = config.hparam_sets[v.hparam_set]
            hp = dataclasses.replace(hp, **{a: b for a, b in overrides.items() if b is not None}, **v.changes)
            print(f"--- {v.name}, training seed +{k}: {hp}", flush=True)
            runs.setdefault(v.name, []).append(train_or_load(hp, config.seed + k, config, data, quick))
    for name, members in groups:
        runs[name] = [
            {
                "val_prob": np.mean([runs[m][k]["val_prob"] for m in members], axis=0),
                "test_prob": np.mean([runs[m][k]["test_prob"] for m in members], axis=0),
                "seconds": sum(float(runs[m][k]["seconds"]) for m in members),
                "members": f"mean of {' + '.join(members)}",
            }
            for k in range(min(len(runs[m]) for m in members))
        ]
    for name, members in choices:
        runs[name] = []
        for k in range(min(len(runs[m]) for m in members)):
            chosen = pick(runs, members, val_labels, k)
            trained = {t for m in members for t in dict(groups).get(m, [m])}  # an ensemble's members trained once
            total = sum(float(runs[t][k]["seconds"]) for t in trained)
            runs[name].append(runs[chosen][k] | {"seconds": total, "members": f"picked from {' + '.join(members)}",
                                                 "picked": chosen})  # fmt: skip
    first = names[0]
    rows = []
    for name, seeded in runs.items():
        per_seed = [figures(labels, val_labels, r, data.get("sure")) for r in seeded]
        paired = [
            mcnemar((r["test_prob"] >= 0.5) == (labels == 1), (base["test_prob"] >= 0.5) == (labels == 1))
            for r, base in zip(seeded, runs[first], strict=False)  # the seeds both have
        ]
        rows.append(
            {
                "name": name,
                "members": seeded[0].get("members"),
                "picked": [r.get("picked") for r in seeded],
                "seconds": [float(r["seconds"]) for r in seeded],
                "cached": [bool(r.get("cached", False)) for r in seeded],
                "best_epoch": [int(r["best_epoch"]) if "best_epoch" in r else None for r in seeded],
                "per_seed": per_seed,
                "paired": None if name == first else paired,
            }
        )
    return {"n_test": len(labels), "first": first, "seeds": seeds, "rows": rows, "quick": quick}


def report(result: dict[str, Any], command: str) -> str:
    n = result["n_test"]
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"Test figures on the {n} test images; accuracy at cut-off 0.5 with its 95% interval; "
        f'"at recall 0.85": the cut-off chosen on validation for {TARGET}, then test recall and precision there; '
        f"McNemar: exact paired test against `{result['first']}` at the same training seed "
        f"(right only here / right only there, p). False alarms there: on the good cells the experts were sure "
        f"of (probability 0) / on those they gave 1/3; then precision and recall there on the cells the experts "
        f"were sure of alone.",
        "",
        "| variant | seed | training time | best epoch | test accuracy [95%] | balanced | recall | ROC-AUC "
        "| cut-off | recall, precision at recall 0.85 | false alarms there: sure / 1/3 | sure cells: precision, recall "
        "| McNemar vs first |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        label = row["name"] + (f" ({row['members']})" if row["members"] else "")
        for k, f in enumerate(row["per_seed"]):
            low, high = accuracy_interval(round(f["accuracy"] * n), n)
            paired = row["paired"][k] if row["paired"] and k < len(row["paired"]) else None
            shipped = f", picked {row['picked'][k]}" if row["picked"][k] else ""
            versus = "-"
            if paired is not None:
                versus = f"{paired.challenger_only} / {paired.other_only}, p {paired.p_value:.3f}"
            epoch = "-" if row["best_epoch"][k] is None else str(row["best_epoch"][k])
            lines.append(
                f"| {label} | +{k}{shipped} | {row['seconds'][k]:.0f} s | {epoch} "
                f"| **{f['accuracy']:.4f}** [{low:.3f}, {high:.3f}] "
                f"| {f['balanced']:.4f} | {f['recall']:.4f} | {f['roc_auc']:.4f} | {f['cutoff']:.3f} "
                f"| {f['recall_at']:.3f}, {f['precision_at']:.3f} | {errors(f)} | {versus} |"
            )
        if len(row["per_seed"]) > 1:
            mean = {key: float(np.mean([f[key] for f in row["per_seed"]])) for key in row["per_seed"][0]}
            spread = np.ptp([f["accuracy"] for f in row["per_seed"]])
            lines.append(
                f"| {label}, **mean of {len(row['per_seed'])}** | | {np.mean(row['seconds']):.0f} s | "
                f"| **{mean['accuracy']:.4f}** (range {spread:.4f}) | {mean['balanced']:.4f} | {mean['recall']:.4f} "
                f"| {mean['roc_auc']:.4f} | | {mean['recall_at']:.3f}, {mean['precision_at']:.3f} | {errors(mean)} | |"
            )
    lines.append(END)
    return "\n".join(lines)


def errors(f: dict[str, float]) -> str:
    """The two columns on where the errors are, or dashes without the experts' probabilities."""
    if "alarms_sure" not in f:
        return "- | -"
    return f"{f['alarms_sure']:.0f} / {f['alarms_unsure']:.0f} | {f['sure_precision']:.3f}, {f['sure_recall']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", default=[], help="name:set=SET,field=value,... (repeat)")
    parser.add_argument("--ensemble", action="append", default=[], help="name:a+b+c, the mean of variants (repeat)")
    parser.add_argument("--pick", action="append", default=[], help="name:a+b+c, what train ships of them (repeat)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per variant (default 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset (under a minute)")
    parser.add_argument("--write", action="store_true", help="replace the levers section of BENCHMARKS.md")
    options = parser.parse_args()
    specs = options.variant or ["default:", "soft:soft_labels=true"]
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        config = bench_config(options.quick, Path(tmp), "")
        result = measure(config, specs, options.ensemble, options.pick, options.seeds, options.quick)
    args = " ".join(a for a in sys.argv[1:] if a != "--write")
    publish(report(result, "make bench-levers" + (f" ARGS='{args}'" if args else "")), BEGIN, END, options.write,
            options.quick)  # fmt: skip


if __name__ == "__main__":
    main()
