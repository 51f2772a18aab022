"""Images on disk: the folder-per-class layout, seeded stratified splits, decoding and manifests.

Layout: ``<data_dir>/train/<class>/`` and ``<data_dir>/test/<class>/``, one folder per class.
Label 1 is the defect class and 0 the good class (``conf/pipeline.yaml``: ``data``).

Every image is checked before a stage uses it: ``decode_gray`` turns any file into 8-bit gray or
raises ``ImageError`` with the reason; ``load_split`` decodes a whole split once (with the cache
on, keeping the result for the next run) and fails with the list of unusable files (or leaves
them out, when told to skip them); ``check_not_shared`` refuses an image that sits in two
splits or under two classes.

Splitting and digests are pure functions; reading files happens in ``scan_split``,
``decode_gray``, ``load_images`` (and its cache), ``shared_images`` and ``file_sha256``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from steps.core import contract
from steps.datasets import stored

# The decoder is the registered model's own, so training and serving decode alike.
from steps.served.serving import SUFFIXES, ImageError, decode_gray

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(suffix for suffixes in SUFFIXES.values() for suffix in suffixes)  # the served model's formats
SPLITS = ("train", "test")


class DataError(ValueError):
    """The data directory does not hold what the stage needs."""


# Label i's name in metric names; folder names are data.good_class and data.defect_class.
LABEL_NAMES = ("good", "defect")


class Sample(NamedTuple):
    path: Path  # absolute
    label: int  # 1 = defect, 0 = good
    cls: str


def expert_probabilities(data_dir: Path, samples: Sequence[Sample]) -> np.ndarray | None:
    """Each sample's defect probability from ``<data_dir>/manifest.csv`` (column ``probability``, as
    ELPV's experts gave it); None when there is no such manifest or it misses any of the samples."""
    path = data_dir / "manifest.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    if not {"file", "probability"} <= set(frame.columns):
        return None
    probability = dict(zip(frame["file"], frame["probability"], strict=True))
    known = [probability.get(Path(s.path).resolve().relative_to(data_dir.resolve()).as_posix()) for s in samples]
    if any(p is None for p in known):
        return None
    return np.array(known, dtype="float32")


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
        found = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() else []
        raise DataError(
            f"{split_dir}: no class folder {', '.join(repr(m) for m in missing)} (found: "
            f"{', '.join(found) or 'no folders'}); a data set needs both classes; " + layout_help(data_dir, classes)
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


def check_every_class_in(parts: dict[str, Sequence[Sample]], classes: Sequence[str], hint: str) -> None:
    """Refuse, before any work, parts of a split (``{"training": ..., "validation": ...}``) that
    do not each hold every class, naming the counts; ``hint`` says what to change."""
    counts = {name: {cls: sum(1 for s in part if s.cls == cls) for cls in classes} for name, part in parts.items()}
    empty = [f"{name} has no {cls!r}" for name, by in counts.items() for cls, n in by.items() if n == 0]
    if empty:
        shown = "; ".join(f"{name} " + ", ".join(f"{cls} {n}" for cls, n in by.items()) for name, by in counts.items())
        raise DataError(f"{', '.join(empty)} ({shown}): every class must be in each; {hint}")


# --- Decoding ----------------------------------------------------------------------------


def load_images(
    paths: Sequence[Path], image_size: int, progress: bool | None = None, cache: bool = False
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode and resize every image once: ``(n, image_size, image_size, 1)`` float32 in 0..255,
    held in a file and memory-mapped (``steps.datasets.stored``), so a split larger than memory decodes.

    Also returns ``{index: reason}`` for the images that could not be decoded (their slots are
    zeros): every file is tried, so one pass reports all the bad ones. Resizing uses the model's own
    resize (``steps.served.serving.resize``), so an image resized here and one resized inside the served
    model give the same pixels.

    ``cache``: keep the result in ``cache_dir()``, keyed by the files' contents (not their names or
    times), the size and the decoder; a rerun on the same files maps it instead of decoding.
    The cache's contract, whatever its format: an entry is used only when it holds one image per
    file, of the key's size, shape and dtype, and when every file it lists as failed still fails
    to decode (``cache_problem``); otherwise the files are decoded again and the entry replaced.
    Without ``cache`` the images go to a nameless scratch file in the same place.
    """
    shape = (len(paths), image_size, image_size, 1)
    if not paths:
        return np.zeros(shape, np.float32), {}
    if not cache:
        return _decode_all(paths, image_size, progress, stored.scratch(shape, cache_dir()))
    key = _cache_key(paths, image_size)
    path = cache_dir() / f"images-{image_size}-{key}.npy"
    listed = path.with_suffix(".json")  # the failures, written before the images
    try:
        images = np.load(path, mmap_mode="r")
        failures = {int(i): str(reason) for i, reason in json.loads(listed.read_text()).items()}
        problem = cache_problem(images, failures, paths, image_size)
        if problem is None:
            logger.info("mapped %d decoded images from the cache %s", len(images), path)
            return images, failures
        logger.warning("ignoring the cache file %s: %s; decoding again", path, problem)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, AttributeError) as err:  # damaged or truncated
        logger.warning("ignoring the unreadable cache file %s: %s", path, err)
    part = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Decoded into a file aside and renamed: a reader in another process sees the whole file or none.
        handle, name = tempfile.mkstemp(dir=path.parent, suffix=".npy.part")
        os.close(handle)
        part = Path(name)
        out = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32, shape=shape)
        _, failures = _decode_all(paths, image_size, progress, out)
        out.flush()
        del out
        _write_atomically(listed, json.dumps(failures))
        os.replace(part, path)
        return np.load(path, mmap_mode="r"), failures
    except OSError as err:  # a full or read-only disk: train on, uncached
        logger.warning("could not cache the decoded images in %s: %s", path.parent, err)
    finally:  # interrupted or failed, no partial file stays
        if part is not None:
            part.unlink(missing_ok=True)
    return _decode_all(paths, image_size, progress, stored.scratch(shape, cache_dir()))


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".part", delete=False) as tmp:
        try:
            tmp.write(text)
        except OSError:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    os.replace(tmp.name, path)


def cache_problem(images: np.ndarray, failures: dict[int, str], paths: Sequence[Path], size: int) -> str | None:
    """Why a cache entry does not fit its key (None when it does): the count, shape and dtype of its
    images, and its failures, each of which must be a file that still fails to decode."""
    expected = (len(paths), size, size, 1)
    if images.shape != expected or images.dtype != np.float32:
        return f"it holds {images.dtype} images of shape {images.shape}, not float32 {expected}"
    outside = [i for i in failures if not 0 <= i < len(paths)]
    if outside:
        return f"it lists failures for rows {outside[:5]} of {len(paths)} files"
    for i in failures:  # few, and each decode is cheap next to trusting a forged reason
        try:
            decode_gray(paths[i])
        except ImageError:
            continue
        return f"it lists {paths[i]} as failed, which decodes"
    return None


# Part of every cache key: bump it when decoding or resizing changes what they produce.
DECODER_VERSION = "decode_gray-2"


def cache_dir() -> Path:
    """``$DEFECT_CACHE_DIR``, else ``$XDG_CACHE_HOME/defect-detection``, else ``~/.cache/defect-detection``."""
    if os.environ.get("DEFECT_CACHE_DIR"):
        return Path(os.environ["DEFECT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defect-detection"


def _cache_key(paths: Sequence[Path], image_size: int) -> str:
    from steps.served.serving import RESIZE

    h = hashlib.sha256(f"{DECODER_VERSION} {image_size} {sorted(RESIZE.items())}".encode())
    for path in paths:
        try:
            h.update(file_sha256(path).encode())
        except OSError as err:  # the decoder reports it for this file; the key only needs to differ
            h.update(f"unreadable {path.name} {err.errno}".encode())
    return h.hexdigest()[:24]


def _decode_all(
    paths: Sequence[Path], image_size: int, progress: bool | None, out: np.ndarray
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode ``paths`` into ``out``, zeroed ``(len(paths), image_size, image_size, 1)`` float32."""
    from steps.core.progress import Progress
    from steps.served.serving import resize

    failures: dict[int, str] = {}
    with Progress(len(paths), verb="decoded", bar=progress) as bar:
        for i, path in enumerate(paths):
            try:
                out[i] = resize(decode_gray(path), image_size)
            except ImageError as err:
                failures[i] = str(err)
            bar.step()
    return out, failures


class Rejected(NamedTuple):
    sample: Sample
    reason: str


def load_split(
    samples: Sequence[Sample], image_size: int, split: str, skip_bad: bool, cache: bool = False
) -> tuple[stored.Rows, list[Sample], list[Rejected]]:
    """Every image of a split, checked before any work: ``(images, kept samples, rejected)``; the
    images are the kept samples' rows of the decoded file, read as they are used.

    Images that cannot be decoded fail the stage with the full list of paths and reasons, unless
    ``skip_bad``: then they are left out and returned, to be counted and logged. Either way, a
    class left with no usable image is refused.
    """
    images, failures = load_images([s.path for s in samples], image_size, cache=cache)
    rejected = [Rejected(samples[i], reason) for i, reason in sorted(failures.items())]
    if rejected and not skip_bad:
        raise DataError(
            f"{split}: {len(rejected)} of {len(samples)} images cannot be used:\n"
            + _listing([f"{r.sample.path}: {r.reason}" for r in rejected])
            + "\nfix or remove them, or pass -P skip_bad_images=true to leave them out (counted and logged)"
        )
    keep = [i for i in range(len(samples)) if i not in failures]
    kept = [samples[i] for i in keep]
    usable = {s.cls for s in kept}
    for cls in dict.fromkeys(s.cls for s in samples):  # in label order
        if cls not in usable:
            n_class = sum(1 for s in samples if s.cls == cls)
            raise DataError(f"{split}: class {cls!r} has no usable image: all {n_class} skipped")
    if rejected:
        logger.warning("%s: skipped %d unreadable images of %d", split, len(rejected), len(samples))
    return stored.Rows(images, keep), kept, rejected


def class_balance(samples: Sequence[Sample], split: str) -> dict[str, float]:
    """Images per class, as metrics named by label (``n_<split>_good``, ``n_<split>_defect``)."""
    counts: dict[str, float] = {contract.class_count_metric(split, name): 0 for name in LABEL_NAMES}
    for s in samples:
        counts[contract.class_count_metric(split, LABEL_NAMES[s.label])] += 1
    return counts


def describe_balance(counts: dict[str, float], split: str) -> str:
    """``good 1402 (71.2%), defect 566 (28.8%)`` for one split of ``class_balance``'s counts."""
    mine = {name: counts[contract.class_count_metric(split, name)] for name in LABEL_NAMES}
    total = sum(mine.values()) or 1
    return ", ".join(f"{name} {n:.0f} ({n / total:.1%})" for name, n in mine.items())


def other_split(data_dir: Path, split: str, classes: Sequence[str]) -> dict[str, list[Sample]]:
    """``{split: samples}`` when that split is there and well formed, else ``{}`` (its own stage checks it)."""
    try:
        return {split: scan_split(data_dir, split, classes)}
    except DataError as err:
        logger.info("not checking %s against %s: %s", split, data_dir, err)
        return {}


def shared_images(splits: dict[str, Sequence[Sample]]) -> list[str]:
    """One line per file content found in more than one split, or in more than one class.

    Identical bytes in train and test make the test score a memory test; identical bytes under
    two classes are a labelling error. Content, not names: copies under other names count.
    """
    where: dict[str, list[tuple[str, Sample]]] = defaultdict(list)
    for split, samples in splits.items():
        for s in samples:
            if s.path.stat().st_size > 0:  # empty files are alike but no image; load_split reports them
                where[file_sha256(s.path)].append((split, s))
    problems = []
    for places in where.values():
        if len({split for split, _ in places}) > 1 or len({s.cls for _, s in places}) > 1:
            problems.append(" = ".join(f"{split}: {s.path}" for split, s in places))
    return sorted(problems)


def _listing(lines: Sequence[str], limit: int = 50) -> str:
    """Indented lines, at most ``limit`` of them: enough to act on, short enough to read."""
    more = [f"... and {len(lines) - limit} more"] if len(lines) > limit else []
    return "\n".join(f"  {line}" for line in [*lines[:limit], *more])


def check_not_shared(splits: dict[str, Sequence[Sample]]) -> None:
    problems = shared_images(splits)
    if problems:
        raise DataError(
            f"{len(problems)} image(s) in more than one split or class (the same bytes):\n{_listing(problems)}\n"
            "each image must be in exactly one of train and test, under one class: remove the copies"
        )


# --- Manifests and digests ---------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, remembered by path, size and modification time: train needs
    each file's for the decoded-image cache key, the overlap check and the manifest, one read will do."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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
