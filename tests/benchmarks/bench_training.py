"""Benchmark: how fast the pipeline trains, next to a plain Keras loop and to the machine's own peak.

Run with ``make bench`` (this, then the timed default ``main`` of ``bench_pipeline.py``), or
``python tests/benchmarks/bench_training.py --write``; ``--quick`` is a smoke check on a tiny subset that
produces every figure in about a minute. All in one process, side by side, so machine noise hits
every variant alike:

- the machine's peak: the best of several large float32 and bfloat16 matrix products (GFLOP/s);
- per hyperparameter set of the default pipeline, on the real training images at the default image
  size: forward FLOPs per image; training images per second of the pipeline's input
  (``steps.datasets.batches.training_batches``, augmentation included) against a plain Keras loop
  (``model.fit`` on the NumPy arrays, no augmentation), interleaved, ``--repeats`` times, as
  a ratio per repeat; the achieved training FLOP/s (3 x forward x images/s) against the peak;
- the best set in ``mixed_bfloat16`` against ``float32``: speed ratio, and how far the same
  weights' validation probabilities move;
- scaling: training time per epoch at a quarter, half and all of the images, and images per second
  at several image sizes (medians of interleaved repeats).

With ``--write`` the results replace the "training" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import make_tiny_elpv, publish, spread  # noqa: E402
from steps.core.config import Config, HParams  # noqa: E402
from steps.core.loader import load_config  # noqa: E402
from steps.datasets.batches import training_batches  # noqa: E402
from steps.datasets.data import load_split, scan_split  # noqa: E402
from steps.datasets.elpv import ensure_data  # noqa: E402
from steps.network.model import forward_flops, make_model, set_seed  # noqa: E402
from steps.network.training import split_train_val  # noqa: E402

BEGIN, END = "<!-- training:begin -->", "<!-- training:end -->"


def peak_gflops(dtype: tf.DType, n: int, repeats: int = 5) -> float:
    """The best of ``repeats`` n x n matrix products in ``dtype``, as GFLOP/s (2 n^3 per product)."""
    a = tf.cast(tf.random.stateless_normal((n, n), seed=[1, 2]), dtype)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=[3, 4]), dtype)
    product = tf.function(tf.linalg.matmul)
    product(a, b).numpy()  # traced and warmed
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def build(hp: HParams, seed: int, policy: str = "float32") -> keras.Model:
    keras.mixed_precision.set_global_policy(policy)
    try:
        set_seed(seed)
        return make_model(hp, seed)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def pipeline_speed(model: keras.Model, x: np.ndarray, y: np.ndarray, hp: HParams, seed: int, steps: int) -> float:
    """Training images per second through the pipeline's input, over ``steps`` steps after one warm step."""
    batches, _ = training_batches(x, y, hp.batch_size, seed, hp.augment)
    model.fit(batches, steps_per_epoch=1, epochs=1, shuffle=False, verbose=0)  # traced and warmed
    start = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    return steps * hp.batch_size / (time.perf_counter() - start)


def plain_speed(model: keras.Model, x: np.ndarray, y: np.ndarray, hp: HParams, steps: int) -> float:
    """Images per second of a plain Keras loop: ``fit`` on the NumPy arrays, shuffled, nothing else."""
    n = steps * hp.batch_size
    index = np.resize(np.arange(len(x)), n)  # as many images as the pipeline's steps, repeating the set
    xs, ys = x[index], y[index]
    model.fit(xs[: hp.batch_size], ys[: hp.batch_size], batch_size=hp.batch_size, verbose=0)  # warmed
    start = time.perf_counter()
    model.fit(xs, ys, batch_size=hp.batch_size, shuffle=True, epochs=1, verbose=0)
    return n / (time.perf_counter() - start)


def measure(config: Config, quick: bool, repeats: int, bfloat16: bool = True) -> dict[str, Any]:
    """Every figure of the training benchmark, on ``config``'s data and sets; without ``bfloat16``,
    no bfloat16 figure (a CPU without bfloat16 instructions emulates it, many times slower)."""
    seed = config.seed
    size = next(iter(config.selected_hparams().values())).image_size
    data_dir = ensure_data(config)
    samples = scan_split(data_dir, "train", config.data.classes)
    images, samples, _ = load_split(samples, size, "train", skip_bad=False, cache=config.data.cache)
    fit, val = split_train_val(samples, config.data.val_fraction, seed)
    labels = np.array([s.label for s in samples], "float32")
    x, y, xv = images[fit], labels[fit], images[val]
    steps = 2 if quick else max(1, len(x) // 32)  # about one epoch of the real set

    result: dict[str, Any] = {"n_train": len(x), "size": size, "steps": steps, "repeats": repeats}
    n = 1024 if quick else 2048
    result["peak"] = {"float32": peak_gflops(tf.float32, n)}
    if bfloat16:
        result["peak"]["bfloat16"] = peak_gflops(tf.bfloat16, n)

    sets = {}
    for name, hp in config.selected_hparams().items():
        # One model for both: the time per step does not depend on the weights.
        model = build(dataclasses.replace(hp, image_size=size), seed)
        ours, plain = [], []
        for _ in range(repeats):  # interleaved: a slow moment of the machine hits both
            ours.append(pipeline_speed(model, x, y, hp, seed, steps))
            plain.append(plain_speed(model, x, y, hp, steps))
        flops = forward_flops(model)
        sets[name] = {
            "flops": flops,
            "pipeline": ours,
            "plain": plain,
            "ratio": [a / b for a, b in zip(ours, plain, strict=True)],
            "achieved": [3 * flops * s / 1e9 for s in ours],
            "model": model,
        }
    result["sets"] = sets

    # The largest set, as the others are chosen relative to it: mixed bfloat16 against float32.
    big = max(sets, key=lambda k: sets[k]["flops"])
    hp = dataclasses.replace(config.hparam_sets[big], image_size=size)
    fp32 = sets[big]["model"]
    if bfloat16:
        result["precision"] = compare_precisions(fp32, hp, big, x, y, xv, seed, repeats, max(2, steps // 4))

    # Scaling: seconds per epoch against the number of images, images per second against the size;
    # each the median of interleaved repeats, as above.
    scale_steps = max(2, steps // 4)
    counts = [max(1, int(len(x) * share)) for share in (0.25, 0.5, 1.0)]
    sizes = (32, 48) if quick else (64, 96, 128, 192)
    grown = {s: np.asarray(tf.image.resize(x[: hp.batch_size * 2], (s, s), antialias=True)) for s in sizes}
    models = {s: fp32 if s == size else build(dataclasses.replace(hp, image_size=s), seed) for s in sizes}
    count_speeds: dict[int, list[float]] = {c: [] for c in counts}
    size_speeds: dict[int, list[float]] = {s: [] for s in sizes}
    for _ in range(repeats):
        for c in counts:
            count_speeds[c].append(pipeline_speed(fp32, x[:c], y[:c], hp, seed, scale_steps))
        for s in sizes:
            size_speeds[s].append(pipeline_speed(models[s], grown[s], y[: len(grown[s])], hp, seed, scale_steps))
    by_count = [(c, c / statistics.median(v)) for c, v in count_speeds.items()]
    by_size = [(s, forward_flops(models[s]), statistics.median(v)) for s, v in size_speeds.items()]
    result["scaling"] = {"set": big, "by_count": by_count, "by_size": by_size}
    for entry in sets.values():
        del entry["model"]
    return result


def compare_precisions(
    fp32: keras.Model, hp: HParams, name: str, x: np.ndarray, y: np.ndarray, xv: np.ndarray, seed: int,
    repeats: int, steps: int,
) -> dict[str, Any]:  # fmt: skip
    """Set ``name`` in mixed bfloat16 against float32: training speeds, and how far the same weights'
    predictions move. ``steps`` is kept short: bfloat16 may be several times slower."""
    bf16 = build(hp, seed, "mixed_bfloat16")
    speeds: dict[str, list[float]] = {"float32": [], "mixed_bfloat16": []}
    for _ in range(repeats):
        speeds["float32"].append(pipeline_speed(fp32, x, y, hp, seed, steps))
        speeds["mixed_bfloat16"].append(pipeline_speed(bf16, x, y, hp, seed, steps))
    bf16.set_weights(fp32.get_weights())  # the same weights, computed in bfloat16
    p32 = fp32.predict(xv, verbose=0).reshape(-1)
    p16 = bf16.predict(xv, verbose=0).reshape(-1)
    return {
        "set": name,
        "speeds": speeds,
        "ratio": [b / a for a, b in zip(speeds["float32"], speeds["mixed_bfloat16"], strict=True)],
        "max_prob_diff": float(np.abs(p32 - p16).max()),
        "same_class": float(np.mean((p32 >= 0.5) == (p16 >= 0.5))),
    }


def report(result: dict[str, Any], command: str) -> str:
    peak = result["peak"]
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"{result['n_train']} training images at {result['size']}x{result['size']}; each speed is "
        f"{result['steps']} training steps after a warm-up, {result['repeats']} interleaved repeats; "
        "a figure with a range is the median (lowest-highest) over the repeats.",
        "",
        "| machine peak (best large matrix product) | GFLOP/s |",
        "| --- | --- |",
        *[f"| {dtype} | {gflops:.0f} |" for dtype, gflops in peak.items()],
        "",
        "| set | forward MFLOP/image | pipeline images/s | plain Keras loop images/s | pipeline / plain "
        "| achieved training GFLOP/s | of float32 peak |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in result["sets"].items():
        achieved = statistics.median(s["achieved"])
        lines.append(
            f"| {name} | {s['flops'] / 1e6:.0f} | {spread(s['pipeline'], '{:.2f}')} | {spread(s['plain'], '{:.2f}')} "
            f"| **{spread(s['ratio'], '{:.2f}')}** | {achieved:.0f} | {achieved / peak['float32']:.0%} |"
        )
    p = result.get("precision")
    if p:
        lines += [
            "",
            f"| set {p['set']}: precision | training images/s |",
            "| --- | --- |",
            *[f"| {policy} | {spread(v, '{:.2f}')} |" for policy, v in p["speeds"].items()],
            f"| mixed_bfloat16 / float32 | **{spread(p['ratio'], '{:.2f}')}** |",
            f"| same weights, validation images: largest probability change | {p['max_prob_diff']:.4f} |",
            f"| same weights, validation images: same class at 0.5 | {p['same_class']:.1%} |",
        ]
    else:
        lines += ["", "bfloat16 not measured (`--no-bfloat16`)."]
    lines += [
        "",
        f"| set {result['scaling']['set']}: training images | seconds per epoch |",
        "| --- | --- |",
        *[f"| {count} | {secs:.3g} |" for count, secs in result["scaling"]["by_count"]],
        "",
        "| image size | forward MFLOP/image | training images/s |",
        "| --- | --- | --- |",
        *[f"| {s} | {f / 1e6:.0f} | {ips:.0f} |" for s, f, ips in result["scaling"]["by_size"]],
        END,
    ]
    return "\n".join(lines)


# The networks trained from scratch, whose speed this measures; the pretrained one's cost is
# tests/benchmarks/bench_pretrained.py's (one of its epochs would take longer than this whole benchmark).
SCRATCH = {"train.hparams": "small,medium,wide"}


def bench_config(quick: bool, tmp: Path) -> Config:
    """The from-scratch sets on the default data; ``quick``: on a tiny real-image subset at 32x32."""
    if not quick:
        return load_config(SCRATCH)
    data = make_tiny_elpv(tmp / "data")
    return load_config({**SCRATCH, "data.dir": str(data), "train.image_size": "32", "data.cache": "false"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, quick 2)")
    parser.add_argument("--no-bfloat16", action="store_true", help="skip the bfloat16 figures (slow where emulated)")
    parser.add_argument("--write", action="store_true", help="replace the training section of BENCHMARKS.md")
    options = parser.parse_args()
    repeats = options.repeats or (2 if options.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        result = measure(bench_config(options.quick, Path(tmp)), options.quick, repeats, not options.no_bfloat16)
    if options.no_bfloat16:  # not a make flag: `make bench` passes ARGS to the pipeline benchmark too
        command = "python tests/benchmarks/bench_training.py" + (" --quick" if options.quick else "") + " --no-bfloat16"
    else:
        command = "make bench" + (" ARGS=--quick" if options.quick else "")
    text = report(result, command)
    publish(text, BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
