"""Benchmark: the exports' parity check, its anonymous memory and time at the stages' batch size against
``PARITY_BATCH``, each runtime in a fresh process.

Run with ``make bench-parity`` (or ``python tests/benchmarks/bench_parity.py --write``; ``--quick`` for a
smoke check at 32 px). It builds the default set with the largest image size (its ImageNet weights,
untrained: the memory and time of scoring do not depend on the weights), writes its ONNX and LiteRT
exports as ``train`` does, and scores ``PARITY_SAMPLE`` images through each export in a new Python
process per measurement, so one's peak cannot hide another's: batches of ``evaluate.batch_size`` (what
the check used before) and of ``PARITY_BATCH``, alternated over two rounds. Each reports the peak
growth of ``RssAnon`` over the process once the export was loaded, what it still held after scoring,
and the seconds. With ``--write`` the results replace the "parity" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402

BEGIN, END = "<!-- parity:begin -->", "<!-- parity:end -->"
ROUNDS = 2

# Run in a new process: load one export, then score the images in batches of the given size.
MEASURE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from steps.core import memory
from steps.served import serving
runtime, path, images, batch = sys.argv[2], sys.argv[3], np.load(sys.argv[4]), int(sys.argv[5])
network = serving.load_export(runtime, Path(path))
loaded = memory.anon_mb()
started = time.perf_counter()
with memory.watch() as window:
    for i in range(0, len(images), batch):
        network.predict_on_batch(images[i : i + batch])
seconds = time.perf_counter() - started
print(json.dumps({"peak": window.peak - loaded, "held": memory.anon_mb() - loaded, "seconds": seconds}))
"""


def build(folder: Path, quick: bool) -> tuple[str, int, int, dict[str, Path]]:
    """The set's exports and the images to score, in ``folder``: (set name, size, stages' batch, paths)."""
    from steps.core.loader import load_config
    from steps.network import exports
    from steps.network.model import make_model

    config = load_config({})
    sets = config.selected_hparams()
    name = max(sets, key=lambda n: sets[n].image_size)
    hp = sets[name]
    if quick:
        name, hp = "small", dataclasses.replace(config.hparam_sets["small"], image_size=32, tta="dihedral")
    network = make_model(hp, seed=0)
    size = hp.image_size
    images = np.random.default_rng(0).uniform(0, 255, (exports.PARITY_SAMPLE, size, size, 1)).astype("float32")
    np.save(folder / "images.npy", images)
    metadata = {"classes": list(config.data.classes), "image_size": size, "decision_threshold": 0.5}
    paths = exports.write_exports(network, size, hp.tta, metadata, folder, list(exports.FILES))
    return name, size, config.evaluate.batch_size, {runtime: paths[runtime] for runtime in exports.FILES}


def measure_one(runtime: str, path: Path, images: Path, batch: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(PROJECT_DIR), runtime, str(path), str(images), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check at 32 px")
    parser.add_argument("--write", action="store_true", help="replace the parity section of BENCHMARKS.md")
    options = parser.parse_args()
    from steps.network.exports import PARITY_BATCH, PARITY_SAMPLE

    with tempfile.TemporaryDirectory(prefix="bench-parity-") as tmp:
        folder = Path(tmp)
        name, size, stage_batch, paths = build(folder, options.quick)
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for round_ in range(ROUNDS):
            for runtime, path in paths.items():
                order = (stage_batch, PARITY_BATCH) if round_ % 2 == 0 else (PARITY_BATCH, stage_batch)
                for batch in order:
                    results.setdefault((runtime, batch), []).append(
                        measure_one(runtime, path, folder / "images.npy", batch)
                    )
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `make bench-parity{' ARGS=--quick' if options.quick else ''}` "
        f"on {machine()}.",
        f"Set {name} at {size} px with its eight test-time views, {PARITY_SAMPLE} images, each export in a fresh "
        f"process, {ROUNDS} rounds alternated (mean; each round's figure in parentheses).",
        "",
        "| runtime | images a batch | peak RssAnon growth | still held after | seconds "
        "| peak against the stages' batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runtime in paths:
        base = np.mean([r["peak"] for r in results[(runtime, stage_batch)]])
        for batch in (stage_batch, PARITY_BATCH):
            rows = results[(runtime, batch)]

            def cell(key: str, fmt: str, rows=rows) -> str:
                each = ", ".join(fmt.format(r[key]) for r in rows)
                return f"{fmt.format(np.mean([r[key] for r in rows]))} ({each})"

            ratio = np.mean([r["peak"] for r in rows]) / base if base > 0 else float("nan")
            lines.append(
                f"| {runtime} | {batch} | {cell('peak', '{:.0f}')} MiB | {cell('held', '{:.0f}')} MiB "
                f"| {cell('seconds', '{:.2f}')} | {ratio:.2f} |"
            )
    lines.append(END)
    publish("\n".join(lines), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
