"""Run a stage's command line with a signal sent to itself at a chosen moment, for the signal tests.

    python tests/signal_at.py SIGNAL MODULE:ATTR[.METHOD] {raise,swallow} [STAGE] -- STAGE ARGS...

STAGE is ``train`` (the default) or ``infer``.

The first call of the named function sends SIGNAL to this process from inside it, so the moment
is an event in the program, not a guess in seconds that a fast or slow machine would break.
``raise`` lets the signal's exception go where it goes; ``swallow`` catches it right there, as an
``except Exception`` in MLflow or TensorFlow's own error translation did when a SIGTERM arrived
while a model was being logged, then carries on with the real call.
"""

from __future__ import annotations

import functools
import importlib
import signal
import sys
from pathlib import Path


def arm(target: str, signum: signal.Signals, swallow: bool) -> None:
    module_name, _, attr_path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original = getattr(owner, name)
    fired = []

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if not fired:
            fired.append(True)
            print(f"signal_at: {signum.name} at {target}", file=sys.stderr, flush=True)
            try:
                signal.raise_signal(signum)  # the handler runs before raise_signal returns
            except BaseException:
                if not swallow:
                    raise
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    signame, target, mode, *rest = sys.argv[1:]
    stage = rest.pop(0) if rest[0] != "--" else "train"
    dash, *stage_args = rest
    assert dash == "--" and mode in ("raise", "swallow") and stage in ("train", "infer"), __doc__
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    arm(target, signal.Signals[signame], swallow=mode == "swallow")
    module = importlib.import_module(f"steps.{stage}")
    from steps import cli

    cli.main(getattr(module, stage), f"{stage}, with a signal at a chosen moment", module.OVERRIDES, argv=stage_args)
