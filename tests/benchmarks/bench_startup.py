"""Benchmark: what a stage's process costs before and besides its work, side by side.

Run with ``make bench-startup`` (or ``python tests/benchmarks/bench_startup.py --write``; ``--quick``
for one round). Two comparisons, CPU seconds (user + system, the process and its children):

- the collector: train (set small, 32 px, one epoch, no exports), evaluate and infer on a tiny real
  ELPV set, each run as MLproject runs it (``python -m steps.<name>``, with the entry points'
  thresholds, ``steps/__init__.py``) and the same stage with Python's default thresholds; a new
  SQLite store for each run of the three, the two ways alternating, ``--rounds`` times;
- ml-dtypes, which TensorFlow, Keras and ONNX import: the installed version's import against
  ``--ml-dtypes`` (0.7.0, the release requirements.txt leaves out), installed with pip into a
  temporary folder; also alternating.

With ``--write`` the results replace the "start-up" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from importlib import metadata
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import mlflow  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import make_tiny_elpv, publish  # noqa: E402
from steps import ENTRY_POINT_GC_THRESHOLDS  # noqa: E402
from steps.core import contract  # noqa: E402

BEGIN, END = "<!-- startup:begin -->", "<!-- startup:end -->"
DEFAULT_THRESHOLDS = gc.get_threshold()  # this script's: Python's own (it is not started with -m steps.*)
STAGES = ("train", "evaluate", "infer")
# The stage with Python's default thresholds: the module run as `python -m` runs it, from `-c`, so
# that the package is not imported as an entry point's (and the defaults are set again, to be sure).
DEFAULT_RUN = "import gc, runpy; gc.set_threshold(*{t}); runpy.run_module({m!r}, run_name='__main__', alter_sys=True)"


def cpu_of(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """CPU seconds of ``cmd`` and its children; fails with its stderr if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def stage_args(stage: str, data: Path, work: Path, store: str) -> list[str]:
    if stage == "train":
        return ["--data_dir", str(data), "--hparams", "small", "--epochs", "1", "--image_size", "32",
                "--experiment", "startup", "--exports", "none"]  # fmt: skip
    if stage == "evaluate":
        client = mlflow.MlflowClient(store)
        experiment = client.get_experiment_by_name(contract.experiment_name(contract.STAGE_TRAIN, "startup"))
        (parent,) = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` IS NULL")
        best = parent.data.tags[contract.TAG_BEST_RUN_ID]
        return ["--run_id", best, "--data_dir", str(data), "--threshold", "0.0", "--experiment", "startup"]
    return ["--input", str(data / "test"), "--output", str(work / "predictions.csv"), "--experiment", "startup"]


def pipeline(way: str, data: Path, work: Path) -> dict[str, float]:
    """CPU seconds of each stage, run one way, in a new store."""
    store = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    seconds = {}
    for stage in STAGES:
        args = stage_args(stage, data, work, store)
        module = f"steps.{stage}"
        if way == "entry point":
            cmd = [sys.executable, "-m", module, *args]
        else:
            cmd = [sys.executable, "-c", DEFAULT_RUN.format(t=DEFAULT_THRESHOLDS, m=module), *args]
        seconds[stage] = cpu_of(cmd, env)
    return seconds


def ml_dtypes_import(version: str, folder: Path) -> str | None:
    """Install ml-dtypes ``version`` into ``folder``; why not, or None."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(folder),
         f"ml-dtypes=={version}"],
        capture_output=True, text=True,
    )  # fmt: skip
    return None if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


def measure(rounds: int, other: str) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[float]], str | None]:
    folder = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        data = make_tiny_elpv(folder / "data")
        ways = ("entry point", "default")
        stages: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for i in range(rounds):
            for way in ways if i % 2 == 0 else ways[::-1]:
                work = folder / f"{way.replace(' ', '-')}-{i}"
                work.mkdir()
                stages[way].append(pipeline(way, data, work))
        installed = metadata.version("ml-dtypes")  # without importing it here
        problem = ml_dtypes_import(other, folder / "other")
        imports: dict[str, list[float]] = {installed: [], other: []}
        for _ in range(0 if problem else max(rounds, 3)):
            for version, path in ((installed, ""), (other, str(folder / "other"))):
                env = {**os.environ, "PYTHONPATH": path}
                imports[version].append(cpu_of([sys.executable, "-c", "import ml_dtypes"], env))
        return stages, imports, problem
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(stages, imports, problem: str | None, other: str, command: str) -> str:
    med = {way: {s: statistics.median(r[s] for r in runs) for s in STAGES} for way, runs in stages.items()}
    rounds = len(stages["entry point"])
    lines = [
        BEGIN,
        "## Start-up: the collector's thresholds and ml-dtypes",
        "",
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`: CPU seconds (user + system),",
        f"medians of {rounds}, the ways alternating.",
        "",
        f"Each stage on a tiny real ELPV set as MLproject runs it (`python -m steps.<name>`, thresholds "
        f"{ENTRY_POINT_GC_THRESHOLDS}) and with Python's defaults {DEFAULT_THRESHOLDS}:",
        "",
        "| stage | entry point | Python's defaults | ratio |",
        "|---|---|---|---|",
    ]
    for stage in (*STAGES, "all three"):
        tuned, plain = (
            (sum(med[w].values()) for w in ("entry point", "default"))
            if stage == "all three"
            else (med["entry point"][stage], med["default"][stage])
        )
        lines.append(f"| {stage} | {tuned:.1f} s | {plain:.1f} s | **{plain / tuned:.2f}x** |")
    lines.append("")
    if problem:
        lines.append(f"ml-dtypes {other} could not be installed for the comparison: {problem}")
    else:
        (installed, mine), (_, theirs) = imports.items()
        a, b = statistics.median(mine), statistics.median(theirs)
        lines += [
            f"`import ml_dtypes` (medians of {len(mine)}): {installed}, installed, {a:.2f} s; {other} {b:.2f} s "
            f"(**{b / a:.1f}x**).",
        ]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round: a smoke check")
    parser.add_argument("--ml-dtypes", default="0.7.0", help="the ml-dtypes release to compare the installed one with")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    stages, imports, problem = measure(1 if args.quick else args.rounds, args.ml_dtypes)
    command = "make bench-startup" + (" ARGS=--quick" if args.quick else "")
    publish(report(stages, imports, problem, args.ml_dtypes, command), BEGIN, END, args.write, args.quick)


if __name__ == "__main__":
    main()
