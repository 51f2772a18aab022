"""Benchmark: what it costs to fine-tune the pretrained backbone, to fit the pipeline's time budget.

Run with ``make bench-pretrained`` or ``python tests/benchmarks/bench_pretrained.py --write``; ``--quick`` is
a smoke check. Training images per second of EfficientNet-Lite0 as ``train`` fine-tunes it (the
pipeline's input, augmentation included), for each resolution, number of frozen blocks and
precision below, measured side by side in one process, interleaved over ``--repeats`` rounds, on
the real training images. With them, the seconds one epoch of the default split takes. With
``--write`` the results replace the "pretrained" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402
from bench_training import build, pipeline_speed  # noqa: E402

from helpers import publish  # noqa: E402
from steps.core.config import HParams  # noqa: E402
from steps.core.loader import load_config  # noqa: E402
from steps.datasets.data import load_split, scan_split  # noqa: E402
from steps.datasets.elpv import ensure_data  # noqa: E402
from steps.network.model import cpu_flags, forward_flops  # noqa: E402

BEGIN, END = "<!-- pretrained:begin -->", "<!-- pretrained:end -->"
SIZES = (160, 192, 224)
FROZEN = (-1, 3, 5, 8)  # -1: everything trains; 3: the stride-4 stages; 5: to 28x28 (at 224); 8: to 14x14


def candidates(quick: bool, sizes=SIZES, frozen=FROZEN) -> list[tuple[int, int, str]]:
    """Every (image size, frozen blocks, precision); bfloat16 where the CPU has it natively, to
    show whether it is faster (``precision: auto`` picks it only with AMX)."""
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    precisions = ["float32"] + (["mixed_bfloat16"] if native else [])
    sizes, frozen = ((64,), (-1, 5)) if quick else (sizes, frozen)
    return [(s, f, p) for s in sizes for f in frozen for p in precisions]


def measure(quick: bool, repeats: int, steps: int, sizes=SIZES, frozen=FROZEN) -> dict[str, Any]:
    config = load_config()
    data_dir = ensure_data(config)
    samples = scan_split(data_dir, "train", config.data.classes)[: 256 if quick else 512]
    labels = np.array([s.label for s in samples], "float32")
    base = HParams(learning_rate=3e-4, batch_size=32, epochs=1, arch="efficientnet_lite0", augment="dihedral")
    n_fit = round(len(scan_split(data_dir, "train", config.data.classes)) * (1 - config.data.val_fraction))
    speeds: dict[tuple[int, int, str], list[float]] = {}
    flops: dict[int, int] = {}
    models = {}
    for size, blocks, precision in candidates(quick, sizes, frozen):
        hp = dataclasses.replace(base, image_size=size, freeze_blocks=blocks)
        models[size, blocks, precision] = hp, build(hp, config.seed, precision)
        flops[size] = forward_flops(models[size, blocks, precision][1])
    images = {size: load_split(samples, size, "train", False, config.data.cache)[0] for size in flops}
    for _ in range(repeats):  # interleaved: noise hits every candidate alike
        for key, (hp, model) in models.items():
            speeds.setdefault(key, []).append(pipeline_speed(model, images[key[0]], labels, hp, config.seed, steps))
    return {"speeds": speeds, "flops": flops, "n_fit": n_fit, "repeats": repeats, "steps": steps}


def report(result: dict[str, Any], quick: bool) -> str:
    lines = [
        BEGIN,
        "### Fine-tuning cost (EfficientNet-Lite0)",
        "",
        f"Measured {date.today().isoformat()} on {machine()}, by `make bench-pretrained`"
        + (f' ARGS="{" ".join(sys.argv[1:])}"'.replace(" --write", "") if len(sys.argv) > 2 else "")
        + (" (--quick: a smoke check)" if quick else "")
        + f": training images per second through the pipeline's input (dihedral augmentation, batch 32),"
        f" median of {result['repeats']} interleaved rounds of {result['steps']} steps each, and what one epoch"
        f" of the {result['n_fit']} fitting images costs at that speed. Frozen: the stem and that many of the 16"
        " blocks get no gradient (-1: none frozen).",
        "",
        "| image size | forward GFLOPs | frozen blocks | precision | training images/s | seconds per epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for (size, frozen, precision), values in result["speeds"].items():
        speed = statistics.median(values)
        lines.append(
            f"| {size} | {result['flops'][size] / 1e9:.2f} | {frozen} | {precision} | {speed:.1f} "
            f"| {result['n_fit'] / speed:.0f} |"
        )
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a few images at 64x64")
    parser.add_argument("--write", action="store_true", help="put the results in BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="image sizes, comma-separated")
    parser.add_argument("--frozen", default=",".join(map(str, FROZEN)), help="frozen blocks, comma-separated")
    args = parser.parse_args(argv)
    repeats, steps = (1, 2) if args.quick else (args.repeats, args.steps)
    sizes, frozen = (tuple(int(v) for v in text.split(",")) for text in (args.sizes, args.frozen))
    result = measure(args.quick, repeats, steps, sizes, frozen)
    publish(report(result, args.quick), BEGIN, END, args.write, args.quick)


if __name__ == "__main__":
    main()
