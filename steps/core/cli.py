"""The thin command line shared by every step: ``-P`` parameters in, one-line errors out.

``mlflow run -P name=value`` reaches a step as ``--name value``. Parameters that map to a
configuration key override ``conf/`` (an empty value keeps the ``conf/`` value); the rest are the
step's own arguments (``run_id``). Every value is checked by ``steps.core.config`` before any work.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from steps.core import signals
from steps.core.config import Config, ConfigError
from steps.core.errors import BUG, STORE, PipelineError, classify, redact
from steps.core.loader import load_config
from steps.mlflow_io.tracking import configure, store_failure

logger = logging.getLogger(__name__)


def parse(
    description: str,
    overrides: Mapping[str, str],
    argv: Sequence[str] | None,
    own: Sequence[str] = (),
) -> tuple[Config, dict[str, str]]:
    """Parse ``--param value`` options; return the resolved config and the step's own arguments."""
    parser = argparse.ArgumentParser(description=description)
    for name in [*overrides, *own]:
        parser.add_argument(f"--{name}", default="", metavar="VALUE")
    args = vars(parser.parse_args(argv))
    given = {overrides[k]: v for k, v in args.items() if k in overrides and v != ""}
    try:
        config = load_config(given)
    except ConfigError as err:
        # Name the parameter the user typed, not only the configuration key it sets.
        names = [name for name, target in overrides.items() if target == err.key and target in given]
        if names:
            raise ConfigError(f"parameter {names[0]} ({err.key})", err.problem) from None
        raise
    return config, {k: args[k] for k in own}


def main(
    step: Callable[..., Any],
    description: str,
    overrides: Mapping[str, str],
    argv: Sequence[str] | None = None,
    own: Sequence[str] = (),
    store: bool = True,
) -> Any:
    """Parse and validate, set up logging and the store (unless ``store`` is false: the step sets it
    up itself), then run ``step(config, **own_args)``.

    Every failure the pipeline foresees prints one line and exits with its kind's code
    (``steps.core.errors``: 2 bad input, 3 model, 4 store, 5 output, 1 partial); anything else keeps its
    traceback and exits 70. A stop signal exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM),
    also when the work under way swallowed its exception (``steps.core.signals``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") >= "2":  # quiet unless asked (steps/__init__.py)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # "tf.function retracing" notes and the like
    try:
        with signals.installed():
            return _run(step, description, overrides, argv, own, store)
    except signals.Terminated:  # arrived after _run had returned, before the handler was removed
        _stopped(signal.SIGTERM)


def _run(
    step: Callable[..., Any],
    description: str,
    overrides: Mapping[str, str],
    argv: Sequence[str] | None,
    own: Sequence[str],
    store: bool = True,
) -> Any:
    try:
        config, own_args = parse(description, overrides, argv, own)
        if store:
            configure()
        result = step(config, **own_args)
        signals.check()  # a signal swallowed after the last run had closed still stops the stage
        return result
    except KeyboardInterrupt as err:
        _stopped(signals.received() or (signal.SIGTERM if isinstance(err, signals.Terminated) else signal.SIGINT))
    except Exception as err:
        if signals.received():  # the error is what the interrupted work made of the signal
            _stopped(signals.received())
        failure = classify(err)
        if failure is BUG:
            traceback.print_exc()
            print(f"error: an unexpected {type(err).__name__} (a bug: the traceback is above)", file=sys.stderr)
            raise SystemExit(failure.exit_code) from None
        message: object = err
        if failure is STORE and not isinstance(err, PipelineError):
            message = store_failure(err)
        elif isinstance(err, OSError):
            message = f"cannot write {err.filename or 'an output'}: {err.strerror or err}"
        print(f"error: {redact(str(message))}", file=sys.stderr)  # a URI in it may carry user:token@
        raise SystemExit(failure.exit_code) from None


def _stopped(signum: signal.Signals | None) -> NoReturn:
    signum = signum or signal.SIGTERM
    print(f"error: stopped by {signum.name}; any run it had started is marked KILLED", file=sys.stderr)
    raise SystemExit(128 + signum) from None
