"""Benchmark: training from decoded images streamed off disk, at 1x and 10x the data, against the
in-memory input the pipeline had before.

Run with ``make bench-streaming`` (``ARGS=--quick`` for a smoke check). The ELPV training images are
decoded at the default set's size into a memory-mapped file (as ``train`` does); a second file holds
ten copies of them, each copy with its own brightness and offset, so every image is distinct. Each
measurement is one epoch of the default set's ``fit`` (``steps.network.training.fit``: the default
network, its augmentation, its validation pass), in a fresh process, with the anonymous resident
memory (``RssAnon``: mapped files do not count, the process's own allocations do) sampled throughout
(``steps.core.memory``) and the training images per second timed from the end of the first batch
(tracing) to the start of validation. The in-memory path is reproduced here as it was: the split
copied into one array, then into one tensor, batches gathered from it. Streamed and in-memory runs
alternate at 1x, so the speed ratio is side by side; the in-memory path at 10x runs a few steps
only, enough to show what it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
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

from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402

BEGIN, END = "<!-- streaming:begin -->", "<!-- streaming:end -->"


def default_set():
    from steps.core.loader import load_config

    config = load_config()
    name = config.train.hparams[0]
    return config, name, config.hparam_sets[name]


def write_data(folder: Path, copies: int, quick: bool) -> dict[str, Any]:
    """The decoded training images (and their labels) at the default size, ``copies`` times over."""
    from steps.datasets.data import load_images, scan_split
    from steps.datasets.elpv import ensure_data

    config, _, hp = default_set()
    samples = scan_split(ensure_data(config), "train", config.data.classes)
    if quick:
        samples = samples[::40]
    images, failures = load_images([s.path for s in samples], hp.image_size, cache=config.data.cache)
    if failures:
        raise SystemExit(f"{len(failures)} training images do not decode")
    labels = np.array([s.label for s in samples], "float32")
    n = len(samples)
    target = np.lib.format.open_memmap(
        folder / f"images-x{copies}.npy", mode="w+", dtype=np.float32, shape=(n * copies, *images.shape[1:])
    )
    for k in range(copies):  # copy by copy: this process never holds more than one copy either
        gain, offset = 1.0 - 0.03 * k, 2.0 * k
        target[k * n : (k + 1) * n] = np.clip(np.asarray(images) * gain + offset, 0, 255)
    target.flush()
    np.save(folder / f"labels-x{copies}.npy", np.tile(labels, copies))
    return {"n": n * copies, "file": str(folder / f"images-x{copies}.npy")}


def in_memory_inputs():
    """The input functions as the pipeline had them before streaming: the whole array in one tensor."""
    import tensorflow as tf

    from steps.datasets.batches import augment

    def training_batches(images, labels, batch_size, seed, mode):
        n = len(images)
        steps = max(1, math.ceil(n / batch_size))
        pixels = tf.constant(images, tf.float32)
        targets = tf.constant(labels, tf.float32)

        def gather(step, batch):
            x = augment(tf.gather(pixels, batch), tf.stack([tf.constant(seed, tf.int64), step]), mode)
            return x, tf.gather(targets, batch)

        order = tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True).batch(batch_size)
        dataset = (
            tf.data.Dataset.zip(tf.data.Dataset.counter(), order.repeat())
            .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE)
        )
        return dataset, steps

    def eval_batches(images, labels, batch_size):
        return tf.data.Dataset.from_tensor_slices((images.astype("float32"), labels.astype("float32"))).batch(
            batch_size
        )

    return training_batches, eval_batches


def child(path: str, mode: str, max_steps: int) -> dict[str, Any]:
    """One epoch of the default set's fit on the file at ``path``, streamed or in memory."""
    import keras

    from steps.core import memory
    from steps.datasets.data import Sample
    from steps.datasets.stored import Rows
    from steps.network import model, training

    config, _, hp = default_set()
    hp = dataclasses.replace(hp, epochs=1)
    mapped = np.load(path, mmap_mode="r")
    labels = np.load(path.replace("images-", "labels-"))
    fit_rows, val_rows = training.split_train_val(
        [Sample(Path(str(i)), int(y), "") for i, y in enumerate(labels)], config.data.val_fraction, 0
    )
    if mode == "memory":
        training.training_batches, training.eval_batches = in_memory_inputs()
        whole = np.array(mapped)  # the split decoded into memory, as load_split returned it
        train_xy, val_xy = (whole[fit_rows], labels[fit_rows]), (whole[val_rows], labels[val_rows])
        del whole
    else:
        train_xy = (Rows(mapped).take(fit_rows), labels[fit_rows])
        val_xy = (Rows(mapped).take(val_rows), labels[val_rows])
    if max_steps:  # fewer steps than an epoch: enough to see what the input holds
        real = training.training_batches

        def limited(*args, **kwargs):
            dataset, steps = real(*args, **kwargs)
            return dataset, min(steps, max_steps)

        training.training_batches = limited
        val_xy = (val_xy[0][: hp.batch_size * 2], val_xy[1][: hp.batch_size * 2])

    marks: dict[str, float] = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                marks["first"] = time.perf_counter()
            marks["batches"] = batch + 1

        def on_test_begin(self, logs=None):
            marks.setdefault("validation", time.perf_counter())

    anon_before = memory.anon_mb()
    with memory.watch() as window:
        training.fit(hp, config.seed, model.resolve_precision(config.train.precision), train_xy, val_xy,
                     config.evaluate.batch_size, callbacks=[Clock()])  # fmt: skip
    timed = min(marks["batches"] * hp.batch_size, len(train_xy[1])) - hp.batch_size
    return {
        "mode": mode,
        "n": int(len(labels)),
        "n_fit": len(fit_rows),
        "batches": marks["batches"],
        "anon_before": anon_before,
        "anon_peak": window.peak,
        "images_per_second": timed / (marks["validation"] - marks["first"]),
    }


def read_cost(path: str, batch_size: int = 32, batches: int = 200) -> float:
    """Milliseconds to read one batch of random rows from the mapped file, as the input pipeline does."""
    from steps.datasets.stored import Rows

    rows, rng = Rows(np.load(path, mmap_mode="r")), np.random.default_rng(0)
    started = time.perf_counter()
    for _ in range(batches):
        rows[rng.choice(len(rows), batch_size, replace=False)].astype(np.float32, copy=False)
    return (time.perf_counter() - started) / batches * 1000


def run_child(path: str, mode: str, max_steps: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", path, "--mode", mode, "--max-steps", str(max_steps)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=PROJECT_DIR, env={**os.environ, "PYTHONHASHSEED": "0"}
    )
    if done.returncode:
        raise SystemExit(f"{mode} on {path} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {mode} x{result['n']}: {result}", file=sys.stderr, flush=True)
    return result


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    (PROJECT_DIR / "bench-out").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=PROJECT_DIR / "bench-out") as tmp:  # on disk: /tmp may be memory
        one = write_data(Path(tmp), 1, quick)
        ten = write_data(Path(tmp), 10, quick)
        speed = {"streamed": [], "memory": []}
        peaks: dict[str, dict[str, Any]] = {}
        for _ in range(rounds):  # alternated: the same machine's moment for both
            for mode in ("streamed", "memory"):
                result = run_child(one["file"], mode)
                speed[mode].append(result["images_per_second"])
                peaks.setdefault(f"{mode} 1x", result)
        read_ms = read_cost(one["file"])
        peaks["streamed 10x"] = run_child(ten["file"], "streamed")
        peaks["memory 10x"] = run_child(ten["file"], "memory", max_steps=4)
    _, name, hp = default_set()
    return {"speed": speed, "peaks": peaks, "set": name, "size": hp.image_size, "quick": quick, "rounds": rounds,
            "read_ms": read_ms, "batch_size": hp.batch_size}  # fmt: skip


def report(result: dict[str, Any], command: str) -> str:
    speed, peaks = result["speed"], result["peaks"]
    streamed, in_memory = statistics.median(speed["streamed"]), statistics.median(speed["memory"])
    base = peaks["streamed 1x"]["anon_peak"]
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"One epoch of `{result['set']}` ({result['size']} px, its augmentation and validation pass) per process; "
        "RssAnon sampled every 50 ms throughout `fit`, in MiB. 10x: ten copies of the training images, each with "
        "its own brightness and offset. The in-memory path at 10x ran 4 steps: its arrays are held from the start.",
        "",
        "| input | images | training images/s (median) | RssAnon before fit | RssAnon peak | peak / streamed 1x |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, row in peaks.items():
        mode = row["mode"]
        shown = f"{statistics.median(speed[mode]):.1f}" if label.endswith(" 1x") else "-"
        lines.append(
            f"| {label} | {row['n']} | {shown} | {row['anon_before']:.0f} | {row['anon_peak']:.0f} | "
            f"{row['anon_peak'] / base:.2f}x |"
        )
    lines += [
        "",
        f"- Streamed at 10x against 1x: the peak grew {peaks['streamed 10x']['anon_peak'] / base - 1:+.1%} "
        "(the goal: under +20%).",
        f"- Streamed against in memory at 1x: {streamed / in_memory:.3f}x the images/s "
        f"({', '.join(f'{v:.1f}' for v in speed['streamed'])} against "
        f"{', '.join(f'{v:.1f}' for v in speed['memory'])}, "
        f"{result['rounds']} alternated rounds; the goal: within 10%).",
        f"- Reading a batch of {result['batch_size']} random rows from the map: {result['read_ms']:.1f} ms, against "
        f"{result['batch_size'] / streamed * 1000:.0f} ms for a training step at the streamed speed.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a few images")
    parser.add_argument("--rounds", type=int, default=2, help="alternated streamed/in-memory rounds at 1x")
    parser.add_argument("--write", action="store_true", help="replace the streaming section of BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, default=0, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(child(options.child, options.mode, options.max_steps)))
        return
    command = "make bench-streaming" + (" ARGS=--quick" if options.quick else "")
    publish(report(measure(options.quick, options.rounds), command), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
