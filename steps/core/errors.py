"""The pipeline's failures: each kind has one line, its own exit code and a run tag.

A stage that cannot go on raises a ``PipelineError`` (or the subclass of its kind) whose message says
what to run or fix first. ``steps.core.cli`` prints it as one line and exits with the kind's code from
``python -m steps.<stage>``; ``steps.mlflow_io.runs`` records the kind on the failed run (tag
``failure_kind``). ``mlflow run`` turns every non-zero exit into 1, so the tag is the portable signal.
Bad configuration (``steps.core.config.ConfigError``) and bad data (``steps.datasets.data.DataError``) are of kind
``input``; ``classify`` sorts any exception.
"""

from __future__ import annotations

import errno
import re
from typing import NamedTuple


class Failure(NamedTuple):
    kind: str
    exit_code: int
    meaning: str


PARTIAL = Failure("partial", 1, "every row was written, but some images could not be read (infer)")
INPUT = Failure("input", 2, "a parameter, the configuration or the data is wrong, or a run or model is missing")
MODEL = Failure("model", 3, "the model cannot be used: not one train logged, refused by the check of its files")
STORE = Failure("store", 4, "the tracking store did not answer: locked by another writer, unreachable, lost")
OUTPUT = Failure("output", 5, "an output could not be written: disk full, read-only, no permission")
DRIFT = Failure("drift", 6, "the images do not look like the model's validation images and -P drift=fail (infer)")
WORKERS = Failure("workers", 7, "a training worker died or hung past train.worker_timeout (workers > 1)")
INTERRUPTED = Failure("interrupted", 130, "stopped by Ctrl-C (130) or SIGTERM (143); its runs end KILLED")
BUG = Failure("bug", 70, "anything else: a bug, printed with its traceback")
FAILURES = (PARTIAL, INPUT, MODEL, STORE, OUTPUT, DRIFT, WORKERS, INTERRUPTED, BUG)


class PipelineError(RuntimeError):
    """A stage cannot go on; the message says what to run or fix first."""

    failure = INPUT

    @property
    def exit_code(self) -> int:
        return self.failure.exit_code


class ModelError(PipelineError):
    """The model is not one this pipeline's ``train`` logged, or its files cannot be read."""

    failure = MODEL


class StoreError(PipelineError):
    """The tracking store did not answer; nothing was changed that the message does not name."""

    failure = STORE


class OutputError(PipelineError):
    """An output file could not be written; the previous one, if any, is untouched."""

    failure = OUTPUT


class WorkerError(PipelineError):
    """Training on several workers lost one of them; no worker goes on alone."""

    failure = WORKERS


# Errors only a write gives (a full or read-only disk, a file over its size limit): the output's
# fault, not the code's. A denied permission can be a read too, so it is left to the code that knows.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def classify(err: BaseException) -> Failure:
    """The kind of a failure (``BUG`` for anything the pipeline did not foresee)."""
    from steps.core.config import ConfigError
    from steps.datasets.data import DataError
    from steps.mlflow_io.tracking import store_failure

    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(err, PipelineError):
        return err.failure
    if isinstance(err, ConfigError | DataError):
        return INPUT
    if store_failure(err) is not None:
        return STORE
    if isinstance(err, OSError) and err.errno in OUTPUT_ERRNOS:
        return OUTPUT
    return BUG


# ``scheme://user:token@host``: the user-info of any URI in a text.
_USERINFO = re.compile(r"(?<=://)[^/\s]*@")


def first_line(err: BaseException, limit: int = 200) -> str:
    """An error's first line, shortened and without credentials: every one-line message quotes errors so."""
    return redact((str(err).strip().splitlines() or [type(err).__name__])[0][:limit])


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``, for anything printed or logged."""
    return _USERINFO.sub("***@", text)
