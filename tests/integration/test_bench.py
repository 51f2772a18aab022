"""The benchmarks' quick modes, on the tiny subset: they produce every figure (never how fast or how accurate).

The pipeline half of the benchmark (``bench_pipeline``) runs in ``test_e2e``, whose ``main`` it times.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from helpers import benchmark
from steps.core.loader import load_config
from steps.datasets.data import Sample

bench_accuracy = benchmark("bench_accuracy")
bench_training = benchmark("bench_training")

pytestmark = pytest.mark.model


def finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.slow
def test_quick_training_benchmark_produces_every_figure(tiny_data):
    # One set: the sets themselves are each trained in test_model and test_steps. No bfloat16: a CPU
    # without its instructions emulates it, many times slower; its figures are checked on their own below.
    config = load_config({"data.dir": str(tiny_data), "train.image_size": "32", "train.hparams": "small"})
    result = bench_training.measure(config, quick=True, repeats=2, bfloat16=False)

    assert list(result["peak"]) == ["float32"] and finite_positive(result["peak"]["float32"])
    assert list(result["sets"]) == ["small"]
    for figures in result["sets"].values():
        assert finite_positive(figures["flops"])
        for key in ("pipeline", "plain", "ratio", "achieved"):
            assert len(figures[key]) == 2 and finite_positive(*figures[key]), key
    assert "precision" not in result
    by_count, by_size = result["scaling"]["by_count"], result["scaling"]["by_size"]
    assert len(by_count) == 3 and all(finite_positive(n, secs) for n, secs in by_count)
    assert [s for s, _, _ in by_size] == [32, 48] and all(finite_positive(f, ips) for _, f, ips in by_size)

    text = bench_training.report(result, "make bench ARGS=--quick")
    assert text.startswith(bench_training.BEGIN) and text.endswith(bench_training.END)
    assert "nan" not in text and "inf" not in text
    for figure in ("float32 |", "pipeline / plain", "of float32 peak", "bfloat16 not measured", "seconds per epoch",
                   "training images/s |", "Measured "):  # fmt: skip
        assert figure in text


def test_precision_comparison_on_a_small_network(tiny_data):
    """bfloat16 against float32 on a network of a few thousand weights at 16x16: seconds even where emulated."""
    config = load_config({"data.dir": str(tiny_data)})
    hp = dataclasses.replace(config.hparam_sets["small"], image_size=16, stem_filters=4, filters=[8], batch_size=8)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 16, 16, 1)).astype("float32")
    y = (rng.uniform(size=16) > 0.5).astype("float32")
    fp32 = bench_training.build(hp, 0)
    result = bench_training.compare_precisions(fp32, hp, "small", x, y, x[:8], seed=0, repeats=1, steps=2)
    assert finite_positive(*result["speeds"]["float32"], *result["speeds"]["mixed_bfloat16"], *result["ratio"])
    assert 0 <= result["max_prob_diff"] < 0.1 and result["same_class"] > 0.5
    rest = {"n_train": 16, "size": 16, "steps": 2, "repeats": 1, "peak": {"float32": 1.0}, "sets": {},
            "scaling": {"set": "small", "by_count": [], "by_size": []}}  # fmt: skip
    text = bench_training.report({**rest, "precision": result}, "make bench")
    for figure in ("mixed_bfloat16 / float32", "largest probability change", "same class at 0.5"):
        assert figure in text


@pytest.mark.slow
def test_quick_accuracy_benchmark_produces_every_figure(tiny_data):
    # One set (medium, standing for the pipeline's) at two seeds, and the from-scratch bar (small).
    config = load_config(
        {"data.dir": str(tiny_data), "train.image_size": "32", "train.epochs": "1", "train.hparams": "medium"}
    )
    result = bench_accuracy.measure(config, seeds=2)

    labels = [row["label"] for row in result["rows"]]
    assert labels == [
        "set medium",
        "set medium, training seed +1",
        "from scratch: set small",
    ]
    assert [row["size"] for row in result["rows"]] == [32, 32, 32]
    assert [row["epochs"] for row in result["rows"]] == [1, 1, 1]
    n_test = len(list((tiny_data / "test").rglob("*.png")))
    assert result["n_test"] == n_test and 0 < result["n_sure"] <= n_test  # the tiny set's manifest.csv
    for row in result["rows"]:
        assert 1 <= row["best_epoch"] <= row["epochs_run"] <= row["epochs"] and finite_positive(row["seconds"])
        for key in ("val_accuracy", "test_accuracy", "test_sure", "balanced", "recall"):
            assert 0.0 <= row[key] <= 1.0, key
        # Accuracy on all test images is the sure and unsure parts weighted by their counts.
        unsure = row["test_unsure"] or 0.0
        weighted = (row["test_sure"] * result["n_sure"] + unsure * (n_test - result["n_sure"])) / n_test
        assert abs(weighted - row["test_accuracy"]) < 1e-9

    text = bench_accuracy.report(result, "make bench-accuracy ARGS=--quick")
    assert text.startswith(bench_accuracy.BEGIN) and text.endswith(bench_accuracy.END)
    assert "nan" not in text and text.count("| set medium") == 2 and text.count("| from scratch: set small") == 1
    for figure in ("validation accuracy", "test accuracy", "balanced accuracy", "defect recall", "test, sure",
                   "test, unsure", "Measured "):  # fmt: skip
        assert figure in text


def test_accuracy_by_expert_certainty_needs_a_manifest_that_covers_every_image(tmp_path):
    samples = [Sample(tmp_path / "test" / "def_front" / "a.png", 1, "def_front"),
               Sample(tmp_path / "test" / "ok_front" / "b.png", 0, "ok_front")]  # fmt: skip
    assert bench_accuracy.expert_certainty(tmp_path, samples) is None  # no manifest: a plain folder-per-class set
    (tmp_path / "manifest.csv").write_text("file,probability\ntest/def_front/a.png,1.0\ntest/ok_front/b.png,0.333\n")
    assert bench_accuracy.expert_certainty(tmp_path, samples).tolist() == [True, False]
    (tmp_path / "manifest.csv").write_text("file,probability\ntest/def_front/a.png,1.0\n")
    assert bench_accuracy.expert_certainty(tmp_path, samples) is None  # b.png is not in it
    assert bench_accuracy.accuracy(np.array([1.0, 0.0]), np.array([0.9, 0.7]), np.array([False, False])) is None


def test_the_pipeline_benchmark_reports_a_rerun_beside_the_first_run():
    bench_pipeline = benchmark("bench_pipeline")

    assert bench_pipeline.again_rows({}, 100.0) == []  # one run only (the end-to-end test's)
    (row,) = bench_pipeline.again_rows({"again": {"wall": 12.0, "reused": ["train", "eval"]}}, 100.0)
    assert row == "| `main` again, nothing changed (reused: train, eval) | 12 s, **0.120** of the first |"


def test_the_pipeline_benchmark_reports_the_machine_speed_beside_the_wall_time():
    bench_pipeline = benchmark("bench_pipeline")
    speed = {"gflops": 150.0, "step_ms": 400.0, "images_per_second": 80.0, "set": "lite160", "precision": "float32"}

    assert bench_pipeline.reference_rows({}, 600.0) == []  # not measured (the end-to-end test's run)
    rows = bench_pipeline.reference_rows({"reference": [speed, {**speed, "step_ms": 600.0}]}, 600.0)
    assert "150 / 150 GFLOP/s" in rows[0] and "400 / 600 ms" in rows[1]
    assert rows[2].endswith("| **1200** |")  # 600 s over the mean step, 0.5 s


def lever_runs(test_labels: np.ndarray, val_labels: np.ndarray) -> dict:
    """Made-up probabilities: ``good`` right on every image, ``poor`` right on validation only."""
    return {
        "good": {"val_prob": val_labels * 0.8 + 0.1, "test_prob": test_labels * 0.8 + 0.1},
        "poor": {"val_prob": val_labels * 0.6 + 0.2, "test_prob": 0.9 - test_labels * 0.8},
    }


def test_levers_benchmark_ensembles_picks_and_pairs_without_training(monkeypatch):
    bench_levers = benchmark("bench_levers")
    test_labels, labels = np.array([0.0, 1.0] * 10), np.array([0.0, 1.0] * 6)
    made = lever_runs(test_labels, labels[:4])
    sure = np.arange(20) >= 2  # the experts gave the first good and the first defective cell 1/3 and 2/3
    data = {"test_labels": test_labels, "labels": labels, "val_rows": [0, 1, 2, 3], "sure": sure}
    monkeypatch.setattr(bench_levers, "load_data", lambda config: data)
    trained = []

    def train_or_load(hp, seed, config, data, quick):
        name = "good" if hp.soft_labels else "poor"
        trained.append((name, seed))
        return made[name] | {"seconds": 10.0, "best_epoch": 1}

    monkeypatch.setattr(bench_levers, "train_or_load", train_or_load)
    config = load_config()
    specs = ["poor:set=lite128,soft_labels=false,seeds=1", "good:set=lite128,soft_labels=true"]
    result = bench_levers.measure(config, specs, ["both:poor+good"], ["ship:poor+good+both"], seeds=2, quick=False)

    assert sorted(trained) == [("good", 42), ("good", 43), ("poor", 42)]  # poor's own seeds=1
    rows = {row["name"]: row for row in result["rows"]}
    assert [f["accuracy"] for f in rows["good"]["per_seed"]] == [1.0, 1.0]
    assert [f["accuracy"] for f in rows["poor"]["per_seed"]] == [0.0]
    assert len(rows["both"]["per_seed"]) == 1  # the seeds every member has
    # Validation ties (both right on it); the lower validation loss decides, as train's pick_best does.
    assert rows["ship"]["picked"] == ["good"] and rows["ship"]["seconds"] == [20.0]  # each training counted once
    (paired,) = rows["good"]["paired"]  # against the first variant, at the one seed both have
    assert (paired.challenger_only, paired.other_only) == (20, 0) and paired.p_value < 0.001
    text = bench_levers.report(result, "make bench-levers")
    assert text.startswith(bench_levers.BEGIN) and text.endswith(bench_levers.END)
    assert "| good, **mean of 2** |" in text and "+0, picked good" in text and "20 / 0, p 0.000" in text
    # Where the errors are, at the cut-off for recall 0.85: poor calls every good cell, 9 the experts were
    # sure of and 1 they were not, and finds none of the sure defects; good calls exactly the defects.
    assert "| 9 / 1 | 0.000, 0.000 |" in text and "| 0 / 0 | 1.000, 1.000 |" in text


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (":set=lite160", "expects name:set=SET"),
        ("x:set", "expects name:set=SET"),
        ("x:set=nosuch", "no set 'nosuch'"),
        ("x:set=lite160,colour=red", "HParams has no field colour"),
        ("x:set=lite160,seeds=0", "seeds must be an integer >= 1"),
    ],
)
def test_levers_benchmark_rejects_a_bad_variant_with_a_clear_error(spec, problem):
    bench_levers = benchmark("bench_levers")
    with pytest.raises(SystemExit, match=problem):
        bench_levers.parse_variant(spec, load_config())
    with pytest.raises(SystemExit, match="expects name:a\\+b"):
        bench_levers.parse_group("pair:a+missing", ["a", "b"])
