"""The default data set, ELPV, and the data directory every stage starts from (``ensure_data``).

When the project's own ``data/`` holds no images (and ``data.bootstrap_elpv`` is true), the ELPV
solar-cell set is copied there from the installed ``elpv-dataset`` package: a cell with defect
probability >= 0.5 goes to the defect class, the rest to the good class, in a 75/25 split
stratified by probability and cell type with a fixed seed (the protocol of Deitsch et al. 2019),
so every machine gets the same files. ``<data_dir>/manifest.csv`` lists them (file, class, split,
probability, type). Images already in the directory are never overwritten or deleted; any other
directory with no images is an error naming the expected layout. The copy is all or nothing: a
marker file (``.elpv-incomplete``) stands in ``data/`` from the first split moved into place until
the manifest is written, and a run that finds it removes the copied files and copies again.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from steps.core.config import PROJECT_DIR, Config
from steps.datasets.data import SPLITS, DataError, has_images, layout_help, stratified_split

logger = logging.getLogger(__name__)

# Fixed, not conf's seed: the test set must stay the same when people change the training seed.
ELPV_SPLIT_SEED = 2019
ELPV_TEST_FRACTION = 0.25
ELPV_DEFECT_AT = 0.5


# Stands in data/ while ELPV's splits are moved into place; removed once the manifest is written.
INCOMPLETE = ".elpv-incomplete"
STAGING_PREFIX = ".elpv-staging-"


def ensure_data(config: Config) -> Path:
    """The data directory, filled from ELPV first if it is the project's empty ``data/``."""
    data_dir = Path(config.data.dir).resolve()
    own = config.data.bootstrap_elpv and data_dir == (PROJECT_DIR / "data").resolve()
    if own and (data_dir / INCOMPLETE).exists():
        logger.warning("an earlier copy of ELPV into %s stopped half way: removing it and copying again", data_dir)
        undo_elpv(data_dir, config.data.classes)
    if any(has_images(data_dir / split) for split in SPLITS):
        return data_dir
    if own:
        materialize_elpv(data_dir, config.data.classes)
        return data_dir
    if not data_dir.is_dir():
        raise DataError(
            f"data.dir (-P data_dir): {data_dir} is not a directory; " + layout_help(data_dir, config.data.classes)
        )
    raise DataError(f"{data_dir}: no images; " + layout_help(data_dir, config.data.classes))


def elpv_labels() -> pd.DataFrame:
    """The package's ``labels.csv``: ``source`` (absolute path), ``probability``, ``type``."""
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    frame = pd.read_csv(root / "labels.csv", sep=r"\s+", header=None, names=["path", "probability", "type"])
    frame["source"] = [str(root / p) for p in frame["path"]]
    return frame


def elpv_split(labels: pd.DataFrame, classes: tuple[str, str]) -> pd.DataFrame:
    """Assign class and split to every ELPV cell: the manifest, before any file is copied."""
    strata = list(zip(labels["probability"], labels["type"], strict=True))
    _, test = stratified_split(strata, ELPV_TEST_FRACTION, ELPV_SPLIT_SEED)
    split = ["train"] * len(labels)
    for i in test:
        split[i] = "test"
    good, defect = classes
    cls = [defect if p >= ELPV_DEFECT_AT else good for p in labels["probability"]]
    names = [Path(p).name for p in labels["path"]]
    return pd.DataFrame(
        {
            "file": [f"{s}/{c}/{n}" for s, c, n in zip(split, cls, names, strict=True)],
            "class": cls,
            "split": split,
            "probability": labels["probability"],
            "type": labels["type"],
            "source": labels["source"],
        }
    )


def undo_elpv(data_dir: Path, classes: tuple[str, str]) -> None:
    """Remove what an interrupted ``materialize_elpv`` left: its staging folders and the files it
    moved into place (only those, by name; anything else found there is an error, not deleted)."""
    for staging in data_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(staging, ignore_errors=True)
    planned = {data_dir / f for f in elpv_split(elpv_labels(), classes)["file"]}
    for split in SPLITS:
        if not (data_dir / split).exists():
            continue
        for path in [p for p in (data_dir / split).rglob("*") if p.is_file() or p.is_symlink()]:
            if path not in planned:
                raise DataError(
                    f"{data_dir} holds a half-finished copy of ELPV ({INCOMPLETE}) and also {path}, which is not "
                    f"part of it: move your files out of {data_dir} and rerun"
                )
            path.unlink()
        _remove_empty_tree(data_dir / split)
    (data_dir / "manifest.csv").unlink(missing_ok=True)
    (data_dir / INCOMPLETE).unlink()


def materialize_elpv(data_dir: Path, classes: tuple[str, str]) -> pd.DataFrame:
    """Copy ELPV into ``data_dir``, all or nothing: staged, moved into place under a marker, then
    the manifest written, then the marker removed (``ensure_data`` undoes a copy that stopped)."""
    for split in SPLITS:
        leftovers = [p for p in (data_dir / split).rglob("*") if p.is_file()] if (data_dir / split).exists() else []
        if leftovers:
            raise DataError(
                f"{data_dir / split} holds files but no images ({leftovers[0].name}, ...); "
                "move them away or pass another -P data_dir"
            )
    plan = elpv_split(elpv_labels(), classes)
    logger.info("materializing the ELPV set into %s (%d images, from the elpv-dataset package)", data_dir, len(plan))
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = plan.drop(columns="source")
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=STAGING_PREFIX) as staging:
        for row in plan.itertuples():
            target = Path(staging) / row.file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(row.source, target)  # the original PNG bytes, not a re-encode
        manifest.to_csv(Path(staging) / "manifest.csv", index=False)
        # Two folders cannot be renamed at once: the marker says "not done" until both and the
        # manifest are in place, so a death in between is undone by the next run, not trusted.
        (data_dir / INCOMPLETE).write_text("ELPV is being copied here; a run that finds this file copies it again\n")
        for split in SPLITS:
            if (data_dir / split).exists():
                _remove_empty_tree(data_dir / split)
            os.rename(Path(staging) / split, data_dir / split)
        os.replace(Path(staging) / "manifest.csv", data_dir / "manifest.csv")
        (data_dir / INCOMPLETE).unlink()
    counts = manifest.groupby(["split", "class"]).size()
    logger.info("ELPV split: %s", ", ".join(f"{s}/{c}={n}" for (s, c), n in counts.items()))
    return manifest


def _remove_empty_tree(directory: Path) -> None:
    """Remove a tree of empty folders (checked by the caller to hold no files)."""
    for sub in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    directory.rmdir()
