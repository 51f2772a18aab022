"""Benchmark: infer's Spark engine on a standalone cluster of one and two workers, against local mode.

Run with ``make bench-spark`` (``ARGS=--quick`` for a smoke check). The model is the one ``make
bench-drift`` trains and keeps (the first default set; trained here if it is not kept yet), logged to a
temporary store; ``infer -P engine=spark`` scores the test images with ``local[*]``, then on a master
with one worker (all cores) and with two workers (a core each) started from pyspark's own jars on
127.0.0.1, and the local engine for reference, each timed whole (Spark's start-up included) and as
images per second. On one 2-core machine this shows Spark's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
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

from bench_accuracy import bench_config  # noqa: E402
from bench_drift import model_and_profile  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import publish, spark_cluster  # noqa: E402
from steps.served import packaging  # noqa: E402

BEGIN, END = "<!-- spark:begin -->", "<!-- spark:end -->"


def timed_infer(uri: str, images: Path, output: Path, engine: str, master: str) -> float:
    from pyspark.sql import SparkSession

    from steps import infer
    from steps.core.loader import load_config

    if SparkSession.getActiveSession():  # a session is reused by getOrCreate whatever the master: a new one each
        SparkSession.getActiveSession().stop()
    values = {"infer.model_uri": uri, "infer.input": str(images), "infer.output": str(output), "infer.engine": engine,
              "infer.spark_master": master, "infer.drift": "off", "infer.review_top": "0", "infer.gradcam_top": "0",
              "experiment": "bench-spark"}  # fmt: skip
    started = time.perf_counter()
    infer.infer(load_config(values))
    seconds = time.perf_counter() - started
    if SparkSession.getActiveSession():  # before its cluster stops
        SparkSession.getActiveSession().stop()
    return seconds


def measure(quick: bool) -> dict[str, Any]:
    import mlflow

    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(quick, Path(tmp), "")
        network, profile, size = model_and_profile(config, quick)
        images = Path(config.data.dir) / "test"
        n = sum(1 for p in images.rglob("*") if p.is_file())
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        metadata = {"classes": list(config.data.classes), "image_size": size, "decision_threshold": 0.5}
        with mlflow.start_run() as run:
            packaging.log_model(network, config, metadata, np.zeros((size, size, 1), "float32"), None, profile)
        uri = f"runs:/{run.info.run_id}/model"
        out = Path(tmp) / "p.csv"
        seconds = {"local engine": timed_infer(uri, images, out, "local", "local[*]"),
                   f"Spark local[{cores}]": timed_infer(uri, images, out, "spark", f"local[{cores}]")}  # fmt: skip
        with spark_cluster(Path(tmp) / "one", workers=1, cores=cores) as cluster:
            seconds[f"Spark standalone, 1 worker x {cores} cores"] = timed_infer(
                uri, images, out, "spark", cluster.master
            )
        with spark_cluster(Path(tmp) / "two", workers=2, cores=max(1, cores // 2)) as cluster:
            seconds[f"Spark standalone, 2 workers x {max(1, cores // 2)} core"] = timed_infer(
                uri, images, out, "spark", cluster.master
            )
    return {"n": n, "seconds": seconds, "quick": quick}


def report(result: dict[str, Any], command: str) -> str:
    base = result["seconds"]["local engine"]
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"`infer` on the {result['n']} test images, whole (Spark's start-up included), one run each, in this order. "
        "On one machine with two cores, workers add overhead and no cores: this is the price, not a speed-up.",
        "",
        "| engine | seconds | images/s | against the local engine |",
        "| --- | --- | --- | --- |",
    ]
    for name, seconds in result["seconds"].items():
        lines.append(f"| {name} | {seconds:.1f} | {result['n'] / seconds:.1f} | {seconds / base:.2f}x the time |")
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset")
    parser.add_argument("--write", action="store_true", help="replace the Spark section of BENCHMARKS.md")
    options = parser.parse_args()
    command = "make bench-spark" + (" ARGS=--quick" if options.quick else "")
    publish(report(measure(options.quick), command), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
