"""The memory figures every run logs (steps.core.memory): anonymous memory seen, mapped files not."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from steps.core import memory

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is read from /proc"),
]

MB = 2**20


def test_a_window_sees_an_array_that_came_and_went():
    with memory.watch() as outer:
        with memory.watch() as window:
            before = window.peak
            held = np.ones(256 * MB // 8)  # 256 MiB, every page touched
            time.sleep(4 * memory.EVERY_SECONDS)  # held across samples, as a training step's batch is
            del held
        after = memory.anon_mb()
    assert window.peak - before > 200  # seen, although freed before the window closed
    assert outer.peak >= window.peak and after < window.peak - 200
    assert memory.peak_rss_mb() >= window.peak


def test_a_mapped_file_read_whole_is_not_anonymous_memory(tmp_path):
    np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(64, MB // 4)).flush()
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")  # 256 MiB on disk
    with memory.watch() as window:
        before = window.peak
        total = sum(float(mapped[i].sum()) for i in range(len(mapped)))  # every page read in
    assert total == 0.0
    assert window.peak - before < 64  # the pages are the file's, not the process's
