"""Benchmark: how well ``label`` tells a changed copy of a test image from another image.

Run with ``make bench-near-copies``. On the data set (ELPV by default), with ``steps.datasets.intake``'s
own thumbnail and similarity: the share of test images whose changed copy (exposure, blur, JPEG, noise)
still reaches ``NEAR_COPY`` against its original (refused, as it must be), and the share of the
training images, distinct cells, that reach it against some test image (refused too: the price).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_accuracy import bench_config, split_images  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402
from steps.datasets.intake import NEAR_COPY, similarity, thumbnail  # noqa: E402

BEGIN, END = "<!-- near-copies:begin -->", "<!-- near-copies:end -->"


def _decoded(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"))[:, :, None]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).astype(np.uint8))


def _noisy(image: Image.Image, sigma: float) -> Image.Image:
    pixels = np.asarray(image, np.float32) + np.random.default_rng(0).normal(0, sigma, np.asarray(image).shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


CHANGES = {
    "exposure x0.7": lambda im: _scaled(im, 0.7),
    "exposure x0.5": lambda im: _scaled(im, 0.5),
    "exposure x0.3": lambda im: _scaled(im, 0.3),
    "exposure x1.2": lambda im: _scaled(im, 1.2),
    "blur radius 1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "blur radius 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "JPEG quality 30": lambda im: _jpeg(im, 30),
    "noise sigma 5": lambda im: _noisy(im, 5),
}


def measure(quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        _, train, test, _ = split_images(bench_config(quick, Path(tmp), ""))
        test_images = [Image.open(s.path).convert("L") for s in test]
        test_thumbs = np.stack([thumbnail(_decoded(im)) for im in test_images])
        train_thumbs = np.stack([thumbnail(_decoded(Image.open(s.path))) for s in train])
        nearest = similarity(train_thumbs, test_thumbs).max(axis=1)
        caught = {}
        for name, change in CHANGES.items():
            copies = np.stack([thumbnail(_decoded(change(im))) for im in test_images])
            own = np.einsum("ij,ij->i", copies, test_thumbs)  # each copy against its own original
            caught[name] = float(np.mean(own >= NEAR_COPY))
    return {"n_train": len(train), "n_test": len(test), "refused_distinct": float(np.mean(nearest >= NEAR_COPY)),
            "caught": caught, "quick": quick}  # fmt: skip


def report(result: dict, command: str) -> str:
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"`label` refuses an image whose 64 px thumbnail correlates at {NEAR_COPY} or more with a test image's.",
        "",
        "| images | refused |",
        "| --- | --- |",
    ]
    for name, share in result["caught"].items():
        lines.append(f"| each of the {result['n_test']} test images, changed: {name} | {share:.1%} |")
    lines.append(
        f"| the {result['n_train']} training images (distinct cells), against the test images | "
        f"{result['refused_distinct']:.1%} |"
    )
    return "\n".join([*lines, END])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset")
    parser.add_argument("--write", action="store_true", help="replace the near-copies section of BENCHMARKS.md")
    options = parser.parse_args()
    command = "make bench-near-copies" + (" ARGS=--quick" if options.quick else "")
    publish(report(measure(options.quick), command), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
