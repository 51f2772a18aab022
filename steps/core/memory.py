"""How much memory a stage or a set holds: the peak of the process's anonymous resident memory over a
window, sampled, and the process's peak resident set.

Anonymous memory (``RssAnon``) is what the process itself allocated: arrays, tensors, TensorFlow's
allocator. Memory-mapped files (the decoded images) count toward the resident set but not toward
it, since the kernel can drop their pages and read them again; so ``RssAnon`` is the figure that
says whether a data set must fit in memory. Linux only (``/proc/self/status``); elsewhere the peak
resident set from ``getrusage`` alone, and no sampling.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

STATUS = Path("/proc/self/status")
EVERY_SECONDS = 0.05  # a training step takes longer: a batch's peak is seen


def _status_mb(field: str) -> float | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def anon_mb() -> float | None:
    """The process's anonymous resident memory now, in MiB; None where the system does not say."""
    return _status_mb("RssAnon")


def peak_rss_mb() -> float:
    """The process's peak resident set so far (mapped files included), in MiB."""
    high = _status_mb("VmHWM")
    if high is not None:
        return high
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


class Window:
    """The highest ``anon_mb`` seen while the window was open (None where it cannot be read)."""

    def __init__(self) -> None:
        self.peak: float | None = anon_mb()

    def see(self, value: float) -> None:
        if self.peak is None or value > self.peak:
            self.peak = value


class _Sampler:
    """One daemon thread for the process, feeding every open window."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def open(self, window: Window) -> None:
        with self.lock:
            self.windows.append(window)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
                self.thread.start()

    def close(self, window: Window) -> None:
        value = anon_mb()
        with self.lock:
            if value is not None:
                window.see(value)
            self.windows.remove(window)

    def _run(self) -> None:
        stop = threading.Event()
        while not stop.wait(EVERY_SECONDS):
            value = anon_mb()
            if value is None:
                return
            with self.lock:
                for window in self.windows:
                    window.see(value)


_SAMPLER = _Sampler()


@contextlib.contextmanager
def watch() -> Iterator[Window]:
    """Sample the anonymous memory while the block runs; the window's ``peak`` is its highest value."""
    window = Window()
    _SAMPLER.open(window)
    try:
        yield window
    finally:
        _SAMPLER.close(window)
