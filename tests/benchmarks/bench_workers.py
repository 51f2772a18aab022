"""Benchmark: training images per second with one and two local workers (``-P workers=N``).

Run with ``make bench-workers`` (``ARGS=--quick`` for a smoke check on the tiny set). ``train`` runs as
``python -m steps.train`` with the default set, one epoch, no exports, in a fresh store each time,
alternating one and two workers; the figure is the set's logged ``images_per_second`` (training
images over the epoch's wall time, validation included) and the train run's whole time. Both
workers share this machine's cores, so on two cores this shows what the collectives cost, not a
speed-up: each worker computes half of every batch, and they wait for each other at every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import make_tiny_elpv, publish  # noqa: E402
from steps.core import contract  # noqa: E402

BEGIN, END = "<!-- workers:begin -->", "<!-- workers:end -->"


def one_run(workers: int, params: dict[str, str], tmp: Path) -> dict[str, float]:
    import mlflow

    store = f"sqlite:///{tmp}/workers-{workers}-{len(list(tmp.iterdir()))}.db"
    args = [f"--{k}={v}" for k, v in {**params, "workers": str(workers), "experiment": "bench-workers"}.items()]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "steps.train", *args], cwd=PROJECT_DIR, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"train with {workers} workers failed:\n{done.stderr[-3000:]}")
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["train/bench-workers"], output_format="list")
    parent = next(r for r in runs if not r.data.tags.get("mlflow.parentRunId"))
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    result = {
        "images_per_second": child.data.metrics[contract.METRIC_IMAGES_PER_SECOND],
        "seconds": (parent.info.end_time - parent.info.start_time) / 1000,
    }
    print(f"  {workers} worker(s): {result}", file=sys.stderr, flush=True)
    return result


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    from steps.core.loader import load_config

    config = load_config()
    name = config.train.hparams[0]
    params = {"hparams": name, "epochs": "1", "exports": "none"}
    with tempfile.TemporaryDirectory() as tmp:
        if quick:
            params = {"hparams": "small", "epochs": "1", "exports": "none", "image_size": "32",
                      "data_dir": str(make_tiny_elpv(Path(tmp) / "data"))}  # fmt: skip
        runs = Path(tmp) / "runs"
        runs.mkdir()
        found: dict[int, list[dict[str, float]]] = {1: [], 2: []}
        for _ in range(rounds):  # alternated: the same moment of the machine for both
            for workers in (1, 2):
                found[workers].append(one_run(workers, params, runs))
    return {"found": found, "set": params["hparams"], "quick": quick, "rounds": rounds}


def report(result: dict[str, Any], command: str) -> str:
    found = result["found"]
    speed = {w: statistics.median(r["images_per_second"] for r in runs) for w, runs in found.items()}
    seconds = {w: statistics.median(r["seconds"] for r in runs) for w, runs in found.items()}
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"`train -P hparams={result['set']} -P epochs=1 -P exports=none`, one and two workers on this machine, "
        f"alternated, {result['rounds']} rounds, medians. Both workers share its cores: this is the price of "
        "the collectives, not a speed-up.",
        "",
        "| workers | training images/s (epoch, validation included) | train run, whole | images/s against one worker |",
        "| --- | --- | --- | --- |",
    ]
    for workers in sorted(found):
        each = ", ".join(f"{r['images_per_second']:.1f}" for r in found[workers])
        lines.append(f"| {workers} | {speed[workers]:.1f} ({each}) | {seconds[workers]:.0f} s "
                     f"| {speed[workers] / speed[1]:.2f}x |")  # fmt: skip
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on the tiny set")
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of one and two workers")
    parser.add_argument("--write", action="store_true", help="replace the workers section of BENCHMARKS.md")
    options = parser.parse_args()
    command = "make bench-workers" + (" ARGS=--quick" if options.quick else "")
    publish(report(measure(options.quick, options.rounds), command), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
