"""Adding reviewed images to the training data: all or nothing, by content, never from the test split.

A review names images and their classes: the review queue's ``review.csv`` (``steps.monitoring.review``)
with its ``label`` column filled in (an empty label: not reviewed, left out), or a folder holding one
folder per class. Before anything changes, every image is checked (``plan``): it decodes; its content
(SHA-256) is not already in ``train`` or ``test`` and not twice in the review; and it is no near-copy of
a test image: the normalised cross-correlation of 64 px thumbnails (``similarity``), which a change of
exposure or a slight blur leaves near 1, is below ``NEAR_COPY``. Then (``apply``) the images are copied
into ``train/<class>/`` under names made from their content, each is recorded in ``reviewed.csv`` (where
it came from, which review, when), and where the data has a manifest of the experts' probabilities
(ELPV's) the label is added there as one, so the soft-label sets keep training on every image. A failure
part way removes what was added.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from steps.datasets.data import DataError, file_sha256, is_image, scan_split
from steps.monitoring import review
from steps.served import serving

# Thumbnails compared for near-copies, and the similarity at which one is refused. On ELPV (BENCHMARKS.md,
# "Near-copies"): 99.7% or more of test images changed in exposure (x0.3 to x0.7), by JPEG or by mild noise
# are caught, 87-100% of blurred ones; and 2% of ELPV's own distinct training cells reach it against some
# test cell (neighbouring mono cells of one module are that alike), so they would be refused too.
THUMBNAIL = 64
NEAR_COPY = 0.995
REVIEWED_CSV = "reviewed.csv"
REVIEWED_COLUMNS = ("file", "class", "sha256", "source", "review", "added_at")


class Item(NamedTuple):
    source: Path  # the file to copy
    label: str
    where: str  # how the review names it: "review.csv line 3", or the file's path
    origin: str  # where the image was first scored (the queue's source column), else the file


class Planned(NamedTuple):
    item: Item
    sha256: str
    target: Path  # train/<class>/reviewed-<sha256[:16]><suffix>


def read_review(path: Path, classes: Sequence[str]) -> list[Item]:
    """The labelled images of a review: a filled-in ``review.csv`` or a folder of class folders."""
    if path.is_dir() and (path / review.QUEUE_CSV).is_file():
        path = path / review.QUEUE_CSV
    if path.is_dir():
        items = [Item(p, c, str(p), str(p)) for c in classes for p in sorted((path / c).rglob("*")) if is_image(p)]
        unknown = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name not in classes)
        if unknown:
            raise DataError(f"review {path}: folders {', '.join(unknown)} are no class; expected {', '.join(classes)}")
        if not items:
            raise DataError(f"review {path}: no images in {', '.join(f'{path}/{c}/' for c in classes)}")
        return items
    if not path.is_file():
        raise DataError(f"review {path}: no such file or folder; pass a filled-in {review.QUEUE_CSV} or a class folder")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {review.FILE, review.LABEL} <= set(rows[0]):
        raise DataError(f"review {path}: expected the columns {review.FILE} and {review.LABEL} ({review.QUEUE_CSV})")
    items, problems = [], []
    for n, row in enumerate(rows, start=2):  # the header is line 1
        label = (row[review.LABEL] or "").strip()
        if not label:
            continue
        if label not in classes:
            problems.append(f"line {n}: label {label!r} is no class; expected {' or '.join(classes)}")
            continue
        source = path.parent / row[review.FILE]
        items.append(Item(source, label, f"{path.name} line {n}", row.get(review.SOURCE) or str(source)))
    if problems:
        raise DataError(f"review {path}: " + "; ".join(problems[:10]))
    if not items:
        raise DataError(f"review {path}: no row has a label; fill in the {review.LABEL} column with a class name")
    return items


def thumbnail(gray: np.ndarray) -> np.ndarray:
    """A decoded ``(h, w, 1)`` image as a unit vector of its mean-centred 64 px thumbnail."""
    image = Image.fromarray(np.asarray(gray[:, :, 0], dtype=np.uint8), mode="L")
    g = np.asarray(image.resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
    g = g - g.mean()
    norm = float(np.linalg.norm(g))
    return g / norm if norm > 0 else g


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of each thumbnail of ``a`` with each of ``b``: ``(len(a), len(b))``."""
    return np.asarray(a, np.float32) @ np.asarray(b, np.float32).T


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def plan(items: Sequence[Item], data_dir: Path, classes: Sequence[str]) -> list[Planned]:
    """Check every image of a review against the data; ``DataError`` listing every problem, nothing changed."""
    train, test = scan_split(data_dir, "train", classes), scan_split(data_dir, "test", classes)
    known = {file_sha256(s.path): ("train", s.path) for s in train}
    known |= {file_sha256(s.path): ("test", s.path) for s in test}
    problems: dict[int, str] = {}  # by the item's index: one reason each
    planned: list[Planned] = []
    thumbs: list[np.ndarray] = []
    indexes: list[int] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        try:
            data = item.source.read_bytes()
            gray = serving.decode_gray(data)
        except OSError as err:
            problems[i] = f"{item.where}: cannot read {item.source}: {err.strerror or err}"
            continue
        except serving.ImageError as err:
            problems[i] = f"{item.where}: {item.source} is not a usable image: {err}"
            continue
        digest = _sha256(data)
        if digest in known:
            split, where = known[digest]
            problems[i] = f"{item.where}: {item.source} is already in {split} as {where}"
        elif digest in seen:
            problems[i] = f"{item.where}: {item.source} is the same image as {seen[digest]}"
        seen.setdefault(digest, item.where)
        target = data_dir / "train" / item.label / f"reviewed-{digest[:16]}{item.source.suffix.lower()}"
        planned.append(Planned(item, digest, target))
        thumbs.append(thumbnail(gray))
        indexes.append(i)
    if planned and test:
        test_thumbs = np.stack([thumbnail(serving.decode_gray(s.path.read_bytes())) for s in test])
        scores = similarity(np.stack(thumbs), test_thumbs)
        for p, i, row in zip(planned, indexes, scores, strict=True):
            j = int(np.argmax(row))
            if row[j] >= NEAR_COPY and i not in problems:
                problems[i] = (
                    f"{p.item.where}: {p.item.source} is a near-copy of the test image {test[j].path} (similarity "
                    f"{row[j]:.4f} >= {NEAR_COPY}): a test image must not reach training, even changed"
                )
    if problems:
        listed = "; ".join(problems[i] for i in sorted(problems)[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"nothing added: {len(problems)} of {len(items)} images refused: {listed}{more}")
    return planned


def apply(planned: Sequence[Planned], data_dir: Path, review_name: str, defect_class: str) -> list[dict[str, str]]:
    """Copy the planned images into ``train`` and record them; all or nothing. Returns the records."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records = [
        {"file": p.target.relative_to(data_dir).as_posix(), "class": p.item.label, "sha256": p.sha256,
         "source": p.item.origin, "review": review_name, "added_at": now}
        for p in planned
    ]  # fmt: skip
    created: list[Path] = []
    replaced: dict[Path, bytes | None] = {}
    try:
        for p in planned:
            p.target.parent.mkdir(parents=True, exist_ok=True)
            part = p.target.with_name(f".{p.target.name}.part")
            shutil.copyfile(p.item.source, part)
            created.append(part)
            os.replace(part, p.target)
            created[-1] = p.target
        _append_csv(data_dir / REVIEWED_CSV, records, REVIEWED_COLUMNS, replaced)
        manifest = data_dir / "manifest.csv"
        if manifest.is_file():
            frame = pd.read_csv(manifest)
            if {"file", "probability"} <= set(frame.columns):
                rows = [
                    {"file": r["file"], "class": r["class"], "split": "train", "type": "reviewed",
                     "probability": 1.0 if r["class"] == defect_class else 0.0}
                    for r in records
                ]  # fmt: skip
                _append_csv(manifest, rows, tuple(frame.columns), replaced)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        for path, before in replaced.items():
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(before)
        raise
    return records


def _append_csv(path: Path, rows: Sequence[dict], columns: Sequence[str], replaced: dict[Path, bytes | None]) -> None:
    """Append ``rows`` to a CSV (a header first if it is new), through a file renamed into place;
    ``replaced`` keeps the file's previous bytes, to put back on a failure."""
    before = path.read_bytes() if path.exists() else None
    part = path.with_name(f".{path.name}.part")
    with part.open("w", newline="") as handle:
        if before:
            handle.write(before.decode())
            if not before.endswith(b"\n"):
                handle.write("\n")
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        if not before:
            writer.writeheader()
        writer.writerows(rows)
    replaced[path] = before
    os.replace(part, path)
