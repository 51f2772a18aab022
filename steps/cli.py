"""The thin command line shared by every step: ``-P`` parameters in, one-line errors out.

``mlflow run -P name=value`` reaches a step as ``--name value``. Parameters that map to a
configuration key override ``conf/`` (an empty value keeps the ``conf/`` value); the rest are the
step's own arguments (``run_id``). Every value is checked by ``steps.config`` before any work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from steps.config import Config, ConfigError, load_config
from steps.data import DataError
from steps.tracking import PipelineError, configure

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
    config = load_config({overrides[k]: v for k, v in args.items() if k in overrides and v != ""})
    return config, {k: args[k] for k in own}


def main(
    step: Callable[..., Any],
    description: str,
    overrides: Mapping[str, str],
    argv: Sequence[str] | None = None,
    own: Sequence[str] = (),
) -> Any:
    """Parse and validate, set up logging and the store, then run ``step(config, **own_args)``.

    A user error (bad parameter, bad data, missing run or model) exits 2 with one line.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, own_args = parse(description, overrides, argv, own)
        configure()
        return step(config, **own_args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
