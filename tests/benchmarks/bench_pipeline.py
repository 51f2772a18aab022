"""Benchmark: the default `main` on the full ELPV set, timed, with its test metrics read back from MLflow.

Run with ``make bench`` (after ``bench_training.py``) or ``python tests/benchmarks/bench_pipeline.py --write``;
``--quick`` runs it on a tiny ELPV subset for one epoch at 32x32, a smoke check. It runs
``mlflow run . -e main --env-manager local`` against a fresh temporary SQLite store, so earlier
runs and registry versions cannot change the outcome, and reports the wall time of the whole
pipeline and of each stage run, plus the evaluation metrics of the model it registered. Then it
runs the same ``main`` again in that store, nothing changed, and reports its wall time beside the
first: train and evaluate are reused (docs/stages.md, "Rerunning main"), infer runs again. Before
and after, the machine's speed (``reference.py``: the float32 matrix-product peak and one training
step of the default network, each in a fresh process) is measured and reported beside the wall
time, which is also given in reference steps, a figure to compare across machines. With
``--write`` the results replace the "pipeline" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import mlflow

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from helpers import make_tiny_elpv, mlflow_run, publish  # noqa: E402
from steps.core import contract  # noqa: E402

BEGIN, END = "<!-- pipeline:begin -->", "<!-- pipeline:end -->"


def machine() -> str:
    """The machine a figure was measured on: cores, the CPU (with its family and model, since one
    name covers several generations) and what it has for bfloat16, and the library versions."""
    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" in info:
        flags = set(info.get("flags", "").split())
        bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bfloat16"
        cpu = f"{info['model name']}, family {info.get('cpu family', '?')} model {info.get('model', '?')}, {bf16}"
    import keras
    import tensorflow as tf

    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"MLflow {mlflow.__version__}"
    )


def reference() -> dict[str, float | str]:
    """The machine's speed now (``reference.measure``), in a fresh process: nothing of this one's
    TensorFlow state, nor of its threads, is shared with the timed run."""
    script = Path(__file__).with_name("reference.py")
    out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(params: dict[str, str], store: str | None = None, experiment: str = "bench") -> dict[str, object]:
    """Run main (in a fresh temporary store unless given one) and read back what the report shows."""
    if store is None:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            return run({"output": f"{tmp}/predictions.csv", **params}, f"sqlite:///{tmp}/mlflow.db", experiment)
    start = time.perf_counter()
    mlflow_run("main", {"experiment": experiment, **params}, store, f"pipeline/{experiment}", check=True)
    wall = time.perf_counter() - start

    mlflow.set_tracking_uri(store)
    client = mlflow.MlflowClient()
    main_experiment = client.get_experiment_by_name(f"pipeline/{experiment}")
    main_run = client.search_runs([main_experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]
    tags = main_run.data.tags

    def seconds(run_id: str) -> float:
        info = client.get_run(run_id).info
        return (info.end_time - info.start_time) / 1000

    train = client.get_run(tags[contract.TAG_TRAIN_RUN_ID])
    children = client.search_runs([train.info.experiment_id], f"tags.`mlflow.parentRunId` = '{train.info.run_id}'")
    evaluation = client.get_run(tags[contract.TAG_EVAL_RUN_ID])
    return {
        "tags": tags,
        "status": main_run.info.status,
        "wall": wall,
        "train": seconds(tags[contract.TAG_TRAIN_RUN_ID]),
        "evaluate": seconds(tags[contract.TAG_EVAL_RUN_ID]),
        "infer": seconds(tags[contract.TAG_INFER_RUN_ID]) if contract.TAG_INFER_RUN_ID in tags else float("nan"),
        "children": sorted(
            (
                c.data.tags[contract.TAG_HPARAM_SET],
                c.data.metrics[contract.METRIC_BEST_VAL_ACCURACY],
                int(c.data.metrics[contract.METRIC_BEST_EPOCH]),
                int(c.data.params["epochs"]),
                seconds(c.info.run_id),
                c.data.metrics.get(contract.METRIC_EXPORT_SECONDS, 0.0),
                c.data.metrics.get(contract.METRIC_PEAK_ANON_MB, float("nan")),
                c.data.metrics.get(contract.METRIC_PEAK_ANON_FIT_MB, float("nan")),
                c.data.metrics.get(contract.METRIC_PEAK_ANON_LOGGING_MB, float("nan")),
            )
            for c in children
        ),
        "memory": {
            stage: memory_of(client.get_run(tags[tag]))
            for stage, tag in (
                ("train", contract.TAG_TRAIN_RUN_ID),
                ("evaluate", contract.TAG_EVAL_RUN_ID),
                ("infer", contract.TAG_INFER_RUN_ID),
            )  # fmt: skip
            if tag in tags
        },
        "best": train.data.tags[contract.TAG_BEST_RUN_ID],
        "best_set": client.get_run(train.data.tags[contract.TAG_BEST_RUN_ID]).data.tags[contract.TAG_HPARAM_SET],
        "metrics": evaluation.data.metrics,
        "registered": f"{tags[contract.TAG_REGISTERED_MODEL]} v{tags[contract.TAG_REGISTERED_VERSION]}",
    }


def memory_of(stage_run) -> tuple[float, float]:
    """A stage run's peak anonymous memory while it was open, and its process's peak resident set, MiB."""
    metrics = stage_run.data.metrics
    return metrics.get(contract.METRIC_PEAK_ANON_MB, float("nan")), metrics.get(
        contract.METRIC_PEAK_RSS_MB, float("nan")
    )


def run_twice(params: dict[str, str]) -> dict[str, object]:
    """``run`` in a fresh temporary store, then once more in that store; the first's result, with
    the second's wall time and which stages it reused under "again"."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        params = {"output": f"{tmp}/predictions.csv", **params}
        store = f"sqlite:///{tmp}/mlflow.db"
        before = reference()
        first = run(params, store)
        after = reference()
        second = run(params, store)
    reused = [s for s in (contract.STAGE_TRAIN, contract.STAGE_EVAL, contract.STAGE_INFER)
              if contract.reused_from_tag(s) in second["tags"]]  # fmt: skip
    return {**first, "again": {"wall": second["wall"], "reused": reused}, "reference": [before, after]}


def with_ci(m: dict[str, float], key: str) -> str:
    """A test figure of evaluate's and its 95% interval, as evaluate logged them."""
    value, low, high = (
        m.get(key + suffix, float("nan")) for suffix in ("", contract.CI_LOW_SUFFIX, contract.CI_HIGH_SUFFIX)
    )
    return f"{value:.4f} [{low:.3f}, {high:.3f}]"


def report(result: dict[str, object], params: dict[str, str], quick: bool = False) -> str:
    m = result["metrics"]
    wall, stages = result["wall"], (result["train"], result["evaluate"], result["infer"])
    exported = sum(child[5] for child in result["children"])
    held = result.get("memory", {})
    keys = (contract.METRIC_PRECISION, contract.METRIC_RECALL, contract.METRIC_F1)
    prf = " / ".join(with_ci(m, k) for k in keys)
    tuned_prf = " / ".join(with_ci(m, contract.TUNED_PREFIX + k) for k in keys)
    cutoff = m.get(contract.METRIC_DECISION_THRESHOLD, float("nan"))
    balanced = with_ci(m, contract.METRIC_BALANCED_ACCURACY)
    tuned_balanced = with_ci(m, contract.TUNED_PREFIX + contract.METRIC_BALANCED_ACCURACY)
    args = " ".join(["--quick"] * quick + [f"-P {k}={v}" for k, v in params.items() if not quick])
    command = "make bench" + (f' ARGS="{args}"' if args else "")
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        "",
        "| what | value |",
        "| --- | --- |",
        "| `main` wall time (3 sets trained, evaluate, infer; goal: at most 20 min) "
        f"| {wall / 60:.1f} min ({wall:.0f} s) |",
        "| train run / evaluate run / infer run | " + " / ".join(f"{s:.0f} s" for s in stages) + " |",
        f"| of which the exports: made and checked in train / checked in evaluate | {exported:.0f} s / "
        f"{m.get(contract.METRIC_EXPORT_SECONDS, 0.0):.0f} s |",
        f"| best set (by val_accuracy) | {result['best_set']} |",
        "| peak memory, RssAnon while the run was open / the process's peak RSS: "
        + " / ".join(held)
        + " | "
        + " / ".join(f"{anon:.0f} / {rss:.0f} MiB" for anon, rss in held.values())
        + " |",
        *again_rows(result, wall),
        *reference_rows(result, wall),
        "",
        f"| on the test set, with 95% intervals | cut-off 0.5 | tuned cut-off {cutoff:.3f} (validation split) |",
        "| --- | --- | --- |",
        f"| accuracy (goal: at least 0.88) | {with_ci(m, contract.METRIC_TEST_ACCURACY)} "
        f"| {with_ci(m, contract.TUNED_PREFIX + contract.METRIC_TEST_ACCURACY)} |",
        f"| balanced accuracy | {balanced} | {tuned_balanced} |",
        f"| precision / recall / F1 (defect positive) | {prf} | {tuned_prf} |",
        f"| ROC-AUC | {m.get(contract.METRIC_ROC_AUC, float('nan')):.4f} | (independent of the cut-off) |",
        "",
        "| what | value |",
        "| --- | --- |",
        f"| registered as | {result['registered']} |",
        "",
        "| hyperparameter set | best val_accuracy | at epoch (of) | run time | of which the exports "
        "| peak RssAnon: the set / training / exports and logging |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {name} | {acc:.4f} | {epoch} ({epochs}) | {secs:.0f} s | {export:.0f} s "
            f"| {anon:.0f} / {fit:.0f} / {logged:.0f} MiB |"
            for name, acc, epoch, epochs, secs, export, anon, fit, logged in result["children"]
        ],
        END,
    ]
    return "\n".join(lines)


def again_rows(result: dict[str, object], wall: float) -> list[str]:
    """The rerun's row, when there was one: its wall time, against the first's, and what it reused."""
    again = result.get("again")
    if not isinstance(again, dict):
        return []
    reused = ", ".join(again["reused"]) or "nothing"
    return [
        f"| `main` again, nothing changed (reused: {reused}) | {again['wall']:.0f} s, "
        f"**{again['wall'] / wall:.3f}** of the first |"
    ]


def reference_rows(result: dict[str, object], wall: float) -> list[str]:
    """The machine's speed before and after the first ``main``, and that run's wall time in
    reference steps (the mean of the two step times), which carries across machines."""
    measured = result.get("reference")
    if not isinstance(measured, list):
        return []
    before, after = measured
    step = (float(before["step_ms"]) + float(after["step_ms"])) / 2000
    return [
        f"| machine speed, before / after: float32 matrix-product peak | {before['gflops']:.0f} / "
        f"{after['gflops']:.0f} GFLOP/s |",
        f"| machine speed, before / after: one training step of {before['set']}, {before['precision']} "
        f"| {before['step_ms']:.0f} / {after['step_ms']:.0f} ms ({before['images_per_second']:.0f} / "
        f"{after['images_per_second']:.0f} images/s) |",
        f"| `main` wall time in reference steps (wall / step time: compare this across machines) "
        f"| **{wall / step:.0f}** |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the pipeline section of BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a smoke check: a tiny ELPV subset, one epoch, 32 px")
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="NAME=VALUE", help="as mlflow run -P")
    options = parser.parse_args()
    params = dict(p.split("=", 1) for p in options.params)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-data-") as tmp:
        if options.quick:
            # threshold 0: one epoch on the tiny set may score below the bar, and infer must still run
            tiny = {"data_dir": str(make_tiny_elpv(Path(tmp) / "data")), "epochs": "1", "image_size": "32",
                    "hparams": "small,medium,wide"}  # fmt: skip
            params = {**tiny, "threshold": "0.0", **params}
        text = report(run_twice(params), params, quick=options.quick)
    publish(text, BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
