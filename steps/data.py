"""Images on disk: the folder-per-class layout, seeded stratified splits, decoding and manifests.

Layout: ``<data_dir>/train/<class>/`` and ``<data_dir>/test/<class>/``, one folder per class.
Label 1 is the defect class and 0 the good class (``conf/pipeline.yaml``: ``data``).

Splitting and digests are pure functions; reading files happens in ``scan_split``,
``decode_gray``, ``load_images`` and ``file_sha256``.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
SPLITS = ("train", "test")


class DataError(ValueError):
    """The data directory does not hold what the stage needs."""


class Sample(NamedTuple):
    path: Path  # absolute
    label: int  # 1 = defect, 0 = good
    cls: str


def layout_help(data_dir: Path, classes: Sequence[str]) -> str:
    folders = ", ".join(f"{data_dir}/{split}/{cls}/" for split in SPLITS for cls in classes)
    return f"expected one folder per class holding images ({', '.join(IMAGE_SUFFIXES)}): {folders}"


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def has_images(directory: Path) -> bool:
    return directory.is_dir() and any(is_image(p) for p in directory.rglob("*"))


def scan_split(data_dir: Path, split: str, classes: Sequence[str]) -> list[Sample]:
    """List ``<data_dir>/<split>/<class>/*`` sorted by path; ``classes[i]`` gets label ``i``."""
    split_dir = data_dir / split
    missing = [cls for cls in classes if not (split_dir / cls).is_dir()]
    if missing:
        raise DataError(
            f"{split_dir}: no class folder {', '.join(repr(m) for m in missing)}; " + layout_help(data_dir, classes)
        )
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (split_dir / cls).rglob("*") if is_image(p))
        if not files:
            raise DataError(f"{split_dir / cls}: no images; " + layout_help(data_dir, classes))
        samples.extend(Sample(p.resolve(), label, cls) for p in files)
    return samples


# --- Splits ------------------------------------------------------------------------------


def stratified_split(strata: Sequence[Hashable], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices ``0..n-1`` into (keep, holdout) with ``round(n * fraction)`` held out.

    Every stratum gives its share; the rounding remainder goes to the strata with the largest
    fractional quotas (largest remainder), so the total is exact and each stratum is within one
    item of its share. The same strata, fraction and seed give the same split.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(strata):
        groups[key].append(index)
    keys = sorted(groups, key=repr)  # a stable order, whatever the key type
    quotas = {k: len(groups[k]) * fraction for k in keys}
    counts = {k: int(np.floor(quotas[k])) for k in keys}
    remainder = int(round(len(strata) * fraction)) - sum(counts.values())
    for k in sorted(keys, key=lambda k: quotas[k] - counts[k], reverse=True)[:remainder]:
        counts[k] += 1
    rng = np.random.default_rng(seed)
    keep, holdout = [], []
    for k in keys:
        shuffled = [groups[k][i] for i in rng.permutation(len(groups[k]))]
        holdout.extend(shuffled[: counts[k]])
        keep.extend(shuffled[counts[k] :])
    return sorted(keep), sorted(holdout)


# --- Decoding ----------------------------------------------------------------------------


def decode_gray(path: Path) -> np.ndarray:
    """Decode any image file to a ``(height, width, 1)`` uint8 grayscale array.

    RGB, RGBA and palette images are converted to luminance; 16-bit images are scaled, not
    clipped, to 8 bits; EXIF orientation is applied, as a viewer would show the image.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            wide = np.asarray(image, dtype=np.int64)
            top = 65535 if image.mode.startswith("I;16") or wide.max() > 255 else 255
            gray = np.clip(wide * 255 // top, 0, 255).astype(np.uint8)
        else:
            gray = np.asarray(image.convert("L"), dtype=np.uint8)
    return gray[:, :, None]


def load_images(paths: Sequence[Path], image_size: int, progress: bool | None = None) -> np.ndarray:
    """Decode and resize every image once: ``(n, image_size, image_size, 1)`` float32 in 0..255.

    Resizing uses the model's own resize (``steps.model.resize``), so an image resized here
    and one resized inside the served model give the same pixels.
    """
    from keras.utils import Progbar

    from steps.model import resize

    out = np.empty((len(paths), image_size, image_size, 1), dtype=np.float32)
    progress = sys.stdout.isatty() if progress is None else progress  # a bar on a terminal, not in logs
    bar = Progbar(len(paths), unit_name="image") if progress and len(paths) > 0 else None
    for i, path in enumerate(paths):
        out[i] = resize(decode_gray(path), image_size)
        if bar is not None and ((i + 1) % 64 == 0 or i + 1 == len(paths)):
            bar.update(i + 1)
    return out


# --- Manifests and digests ---------------------------------------------------------------


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(samples: Sequence[Sample], split: str, root: Path) -> pd.DataFrame:
    """One row per image: ``file`` (relative to ``root``), ``class``, ``split``, ``sha256``."""
    return pd.DataFrame(
        {
            "file": [s.path.relative_to(root).as_posix() for s in samples],
            "class": [s.cls for s in samples],
            "split": [split] * len(samples),
            "sha256": [file_sha256(s.path) for s in samples],
        }
    )


def digest(frame: pd.DataFrame) -> str:
    """A digest of the files' contents and labels, independent of row order and location."""
    rows = sorted(f"{c}\t{h}" for c, h in zip(frame["class"], frame["sha256"], strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
