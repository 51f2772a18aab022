"""Benchmark: building a set's network and training its first epoch, with the optimizer's and metrics'
variables made by ``make_model`` (the pipeline) against left to Keras, side by side.

Run with ``make bench-first-epoch`` (or ``python tests/benchmarks/bench_first_epoch.py --write``;
``--quick`` for one round). Without a distribution strategy Keras creates those variables inside
the first trace of the training step, and TensorFlow then traces the step a second time;
``make_model`` creates them first (``steps/network/model.py``). Each measurement is a new Python process
(TensorFlow imported, nothing traced yet), ``make_model`` and one epoch on 19 random images with 5
for validation, as ``train`` starts a set; the two ways alternate, ``--rounds`` times. Both give
the same weights (tests/integration/test_model.py). With ``--write`` the results replace the "first epoch"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402

BEGIN, END = "<!-- first-epoch:begin -->", "<!-- first-epoch:end -->"
# (set, image size): the from-scratch set at the suite's size, the default pretrained set at its own.
CASES = (("small", 32), ("lite160", 160))

MEASURE = r"""
import dataclasses, json, sys, time
import keras, numpy as np
sys.path.insert(0, sys.argv[1])
from steps.datasets.batches import eval_batches, training_batches
from steps.core.loader import load_config
from steps.network.model import make_model, schedule, set_seed
name, size, way = sys.argv[2], int(sys.argv[3]), sys.argv[4]
hp = dataclasses.replace(load_config().hparam_sets[name], image_size=size, epochs=1)
rng = np.random.default_rng(0)
x, y = rng.integers(0, 256, (24, size, size, 1)).astype("uint8"), (np.arange(24) % 2).astype("float32")
started = time.perf_counter()
if way == "keras":  # as Keras does by itself: the variables made in the first trace
    keras.Model._symbolic_build = lambda self, **kwargs: None
set_seed(0)
model = make_model(hp, seed=0)
batches, steps = training_batches(x[:19], y[:19], hp.batch_size, 0, hp.augment)
model.fit(batches, steps_per_epoch=steps, validation_data=eval_batches(x[19:], y[19:], 64), epochs=1, shuffle=False,
          callbacks=[schedule(hp)], verbose=0)
print(json.dumps({"wall": time.perf_counter() - started}))
"""


def measure_once(name: str, size: int, way: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(PROJECT_DIR), name, str(size), way],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Seconds (wall) of each way, per set, the ways alternating round by round."""
    result: dict[str, dict[str, list[float]]] = {}
    for name, size in CASES:
        times = result.setdefault(f"{name} at {size} px", {"pipeline": [], "keras": []})
        for _ in range(rounds):
            for way in ("keras", "pipeline"):
                seconds = measure_once(name, size, way)["wall"]
                times[way].append(seconds)
                print(f"{name} {size} px, variables made by {way}: {seconds:.1f} s", flush=True)
    return result


def report(result: dict[str, dict[str, list[float]]], command: str) -> str:
    lines = [
        BEGIN,
        "## First epoch: the training step traced once",
        "",
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`: `make_model` and one epoch on 19",
        "random images (5 for validation), each a new process, the two ways alternating. *Keras* leaves the",
        "optimizer's and metrics' variables to the first trace of the training step, which TensorFlow then",
        "traces twice; *pipeline* is `make_model` making them first. Medians of the rounds.",
        "",
        "| set | variables made by Keras | by `make_model` | speed-up |",
        "|---|---|---|---|",
    ]
    for case, times in result.items():
        keras_s, ours = statistics.median(times["keras"]), statistics.median(times["pipeline"])
        lines.append(f"| {case} | {keras_s:.1f} s | {ours:.1f} s | **{keras_s / ours:.2f}x** |")
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round: a smoke check")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    text = report(measure(rounds), "make bench-first-epoch" + (" ARGS=--quick" if args.quick else ""))
    publish(text, BEGIN, END, args.write, args.quick)


if __name__ == "__main__":
    main()
