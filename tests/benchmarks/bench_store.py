"""Benchmark: a new SQLite store against a copy of an empty one, side by side.

Run with ``make bench-store`` (or ``python tests/benchmarks/bench_store.py --write``; ``--quick``
for one round). The test suite gives each test a copy of one empty store made once a session
(``tests/helpers.py: empty_store``) instead of a new store, whose first use runs MLflow's table
creation and schema migrations. Both are timed in one process that has used MLflow already, as a
pytest worker has: CPU seconds from the start to the first query answered, the two ways alternating,
``--rounds`` times. With ``--write`` the results replace the "store" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import mlflow  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402

BEGIN, END = "<!-- store:begin -->", "<!-- store:end -->"


def first_query(uri: str) -> None:
    mlflow.MlflowClient(uri).search_experiments(max_results=1)


def measure(rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each way, alternating round by round."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # MLflow logs each table creation
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        template = folder / "empty.db"
        first_query(f"sqlite:///{template}")  # MLflow imported and used once, as in a test worker
        times: dict[str, list[float]] = {"new": [], "copy": []}
        for i in range(rounds):
            for way in ("new", "copy"):
                db = folder / f"{way}{i}.db"
                started = time.process_time()
                if way == "copy":
                    shutil.copy(template, db)
                first_query(f"sqlite:///{db}")
                times[way].append(time.process_time() - started)
        return times
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(times: dict[str, list[float]], command: str) -> str:
    new, copy = statistics.median(times["new"]), statistics.median(times["copy"])
    return "\n".join([
        BEGIN,
        "## Store: a new SQLite store against a copy of an empty one",
        "",
        f"Measured {date.today().isoformat()} on {machine()} with `{command}`: CPU seconds to the first",
        "query answered, in one process that has used MLflow already, the two ways alternating; medians",
        f"of {len(times['new'])}.",
        "",
        "| new store (MLflow's tables and migrations) | copy of an empty store | ratio |",
        "|---|---|---|",
        f"| {new:.2f} s | {copy:.2f} s | **{new / copy:.0f}x** |",
        END,
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round: a smoke check")
    parser.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    args = parser.parse_args()
    times = measure(1 if args.quick else args.rounds)
    command = "make bench-store" + (" ARGS=--quick" if args.quick else "")
    publish(report(times, command), BEGIN, END, args.write, args.quick)


if __name__ == "__main__":
    main()
