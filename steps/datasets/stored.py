"""Decoded images on disk, read through memory maps: what train and evaluate stream batches from.

A split decoded once is one ``.npy`` file of float32 ``(n, s, s, 1)`` images. ``np.load(mmap_mode="r")``
maps it, so its pages belong to the file, not to the process: the kernel reads them in as batches ask
and drops them under pressure, and the data set no longer has to fit in memory. ``Rows`` is a part
of such an array (a split's training or validation rows) without copying it; indexing it reads only
the rows asked for. ``scratch`` is the same for data that is not kept between runs: a mapped file
whose name is gone at once, so nothing is left behind whatever happens to the process.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class Rows:
    """Rows ``rows`` of ``base`` (an array or a memory map), in that order, read only when indexed.

    ``take`` selects further rows without reading anything; ``rows[i]``, ``rows[a:b]``,
    ``rows[index_array]`` and ``rows[i, :, :, 0]`` read those rows into memory, as NumPy would.
    """

    def __init__(self, base: np.ndarray, rows: Sequence[int] | np.ndarray | None = None) -> None:
        self.base = base
        self.rows = np.arange(len(base), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def take(self, rows: Sequence[int] | np.ndarray) -> Rows:
        return Rows(self.base, self.rows[np.asarray(rows, dtype=np.int64)])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
            picked = self[head]
            return picked[rest] if np.ndim(self.rows[head]) == 0 else picked[(slice(None), *rest)]
        picked = self.rows[key]
        if np.ndim(picked) == 0:
            return np.array(self.base[int(picked)])
        # Read in file order (fewer seeks on a cold cache), returned in the order asked for.
        order = np.argsort(picked, kind="stable")
        out = np.empty((len(picked), *self.base.shape[1:]), dtype=self.base.dtype)
        out[order] = self.base[picked[order]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def as_rows(images: np.ndarray | Rows) -> Rows:
    return images if isinstance(images, Rows) else Rows(images)


def scratch(shape: tuple[int, ...], directory: Path) -> np.ndarray:
    """A zeroed float32 array of ``shape`` backed by a file in ``directory`` that is unlinked at once
    (its pages live as long as the array); an array in memory when no file can be made there."""
    if not shape[0]:
        return np.zeros(shape, np.float32)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".npy.scratch") as tmp:
            return np.lib.format.open_memmap(tmp.name, mode="w+", dtype=np.float32, shape=shape)
    except OSError as err:
        logger.warning("decoding into memory: no scratch file in %s (%s)", directory, err)
        return np.zeros(shape, np.float32)
