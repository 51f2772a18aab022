"""The benchmark's quick mode, on the tiny subset: it produces every figure (never how fast they are).

The pipeline half of the benchmark (``bench_pipeline``) runs in ``test_e2e``, whose ``main`` it times.
"""

from __future__ import annotations

import math

import bench_training
import pytest

from steps.config import load_config

pytestmark = pytest.mark.model


def finite_positive(*values: float) -> bool:
    return all(math.isfinite(v) and v > 0 for v in values)


def test_quick_training_benchmark_produces_every_figure(tiny_data):
    # One set: the sets themselves are each trained in test_model and test_steps.
    config = load_config({"data.dir": str(tiny_data), "train.image_size": "32", "train.hparams": "small"})
    result = bench_training.measure(config, quick=True, repeats=2)

    assert finite_positive(result["peak"]["float32"], result["peak"]["bfloat16"])
    assert list(result["sets"]) == ["small"]
    for figures in result["sets"].values():
        assert finite_positive(figures["flops"])
        for key in ("pipeline", "plain", "ratio", "achieved"):
            assert len(figures[key]) == 2 and finite_positive(*figures[key]), key
    precision = result["precision"]
    assert precision["set"] in config.train.hparams
    assert finite_positive(*precision["speeds"]["float32"], *precision["speeds"]["mixed_bfloat16"], *precision["ratio"])
    assert 0 <= precision["max_prob_diff"] < 0.1 and precision["same_class"] > 0.5
    by_count, by_size = result["scaling"]["by_count"], result["scaling"]["by_size"]
    assert len(by_count) == 3 and all(finite_positive(n, secs) for n, secs in by_count)
    assert [s for s, _, _ in by_size] == [32, 48] and all(finite_positive(f, ips) for _, f, ips in by_size)

    text = bench_training.report(result, "make bench ARGS=--quick")
    assert text.startswith(bench_training.BEGIN) and text.endswith(bench_training.END)
    assert "nan" not in text and "inf" not in text
    for figure in ("float32 |", "bfloat16 |", "pipeline / plain", "of float32 peak", "mixed_bfloat16 / float32",
                   "seconds per epoch", "training images/s |", "Measured "):  # fmt: skip
        assert figure in text
