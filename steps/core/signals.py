"""Stop signals that are never lost: SIGTERM and Ctrl-C are recorded as well as raised.

SIGTERM (``kill``, a cancelled CI job, ``docker stop``) raises ``Terminated`` where the main thread
is, as Ctrl-C raises ``KeyboardInterrupt``, so the stage stops at once. But the code under way may
swallow it: TensorFlow turns an exception raised during one of its ops into its own error type, and
MLflow's input-example validation catches every ``Exception``. So the signal is also recorded, and
``check`` raises it again at each boundary (every training batch, every run's end, the stage's
end): a stage that was told to stop never ends FINISHED or exits 0.

The first signal is the one reported: Ctrl-C on ``mlflow run`` reaches the stage twice, as SIGINT
from the terminal and then as the SIGTERM with which ``mlflow run`` cancels its child. The second
is only recorded, so it neither renames the stop nor cuts short the writes that close the runs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: signal.Signals | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that runs end KILLED."""


def _on_signal(signum: int, frame: object) -> None:
    global _received
    if _received is not None:
        return  # a later signal while the first is being handled: raising again could cut the close short
    _received = signal.Signals(signum)
    raise Terminated() if _received == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Handle SIGTERM and SIGINT while the block runs, then put back the handlers the process had.

    Only for the block: a Python handler runs between bytecodes, so a process whose main thread is
    stuck in C code (a library's exit hook, say) would never act on SIGTERM. Once the stage is done,
    SIGTERM must kill again, as it does a pool worker that ran a stage in-process. Handlers live on
    the main thread; elsewhere this does nothing.
    """
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None  # a signal that stopped an earlier stage in this process is not this one's
    previous = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def received() -> signal.Signals | None:
    """The stop signal this process was sent, if any (whether or not its exception got through)."""
    return _received


def check() -> None:
    """Raise the stop if a signal arrived: call at any point where stopping is safe."""
    if _received is not None:
        raise Terminated() if _received == signal.SIGTERM else KeyboardInterrupt()
