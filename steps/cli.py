"""The thin command line shared by every step: ``-P`` parameters in, one-line errors out.

``mlflow run -P name=value`` reaches a step as ``--name value``. Parameters that map to a
configuration key override ``conf/`` (an empty value keeps the ``conf/`` value); the rest are the
step's own arguments (``run_id``). Every value is checked by ``steps.config`` before any work.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from steps import signals
from steps.config import Config, ConfigError, load_config
from steps.data import DataError
from steps.errors import PipelineError
from steps.tracking import configure, lost_server, redact

logger = logging.getLogger(__name__)

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, DataError, PipelineError)


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
) -> Any:
    """Parse and validate, set up logging and the store, then run ``step(config, **own_args)``.

    A user error (bad parameter, bad data, missing run or model) exits 2 with one line. A stop
    signal exits 128 + its number (130 for Ctrl-C, 143 for SIGTERM), also when the work under way
    swallowed its exception (``steps.signals``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") >= "2":  # quiet unless asked (steps/__init__.py)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # "tf.function retracing" notes and the like
    try:
        with signals.installed():
            return _run(step, description, overrides, argv, own)
    except signals.Terminated:  # arrived after _run had returned, before the handler was removed
        _stopped(signal.SIGTERM)


def _run(
    step: Callable[..., Any],
    description: str,
    overrides: Mapping[str, str],
    argv: Sequence[str] | None,
    own: Sequence[str],
) -> Any:
    try:
        config, own_args = parse(description, overrides, argv, own)
        configure()
        result = step(config, **own_args)
        signals.check()  # a SIGTERM swallowed after the last run had closed still stops with 143
        return result
    except KeyboardInterrupt as err:
        _stopped(signal.SIGTERM if isinstance(err, signals.Terminated) else signal.SIGINT)
    except USER_ERRORS as err:
        if signals.received():
            _stopped(signals.received())
        print(f"error: {redact(str(err))}", file=sys.stderr)  # a URI in it may carry user:token@
        # 1: the step did its work but some inputs failed (infer's unreadable images); 2: it could not start.
        raise SystemExit(getattr(err, "exit_code", 2)) from None
    except Exception as err:
        if signals.received():  # the error is what the interrupted work made of the signal
            _stopped(signals.received())
        lost = lost_server(err)
        if lost is None:
            raise  # a bug: keep the traceback
        print(f"error: {lost}", file=sys.stderr)
        raise SystemExit(2) from None


def _stopped(signum: signal.Signals | None) -> NoReturn:
    signum = signum or signal.SIGTERM
    print(f"error: stopped by {signum.name}; any run it had started is marked KILLED", file=sys.stderr)
    raise SystemExit(128 + signum) from None
