"""The machine's speed, as two fixed reference workloads, so that a timed run can be judged by the
machine it ran on: the float32 matrix-product peak (GFLOP/s) and the time of one training step of
the default network (the first set of ``train.hparams`` in conf/, at its image size, batch size and
the precision ``train`` would pick) on seeded synthetic images.

A figure measured on another machine compares through its wall time in reference steps (the wall
time over the step time): the same work on a machine twice as fast takes half the seconds and about
the same number of steps. ``python tests/benchmarks/reference.py`` prints one measurement as JSON;
``bench_pipeline.py`` runs it in a fresh process before and after the timed ``main``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))

STEPS, WARM_STEPS, MATMUL_N = 20, 3, 2048


def measure(steps: int = STEPS) -> dict[str, float | str]:
    """``{"gflops": float32 matmul peak, "step_ms": median training step, "images_per_second",
    "set": its name, "precision": its precision}`` of the default network on this machine."""
    import keras
    import numpy as np
    import tensorflow as tf
    from bench_training import peak_gflops

    from steps.core.loader import load_config
    from steps.network.model import make_model, resolve_precision, set_seed

    config = load_config()
    name = config.train.hparams[0]
    hp = config.hparam_sets[name]
    precision = resolve_precision(config.train.precision)
    gflops = peak_gflops(tf.float32, MATMUL_N)
    set_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = make_model(hp, 0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (hp.batch_size, hp.image_size, hp.image_size, 1)).astype("float32")
    y = (rng.uniform(size=hp.batch_size) < 0.5).astype("float32")
    for _ in range(WARM_STEPS):  # traced and warmed
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    return {
        "gflops": gflops,
        "step_ms": step * 1000,
        "images_per_second": hp.batch_size / step,
        "set": f"{name} ({hp.arch}, {hp.image_size} px, batch {hp.batch_size})",
        "precision": precision,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    print(json.dumps(measure()))
