"""Run a stage's command line with a signal sent to itself at a chosen moment, for the signal tests.

    python tests/signal_at.py SIGNAL MODULE:ATTR[.METHOD] {raise,swallow} [STAGE] -- STAGE ARGS...
    python tests/signal_at.py --together CASES.json

STAGE is ``train`` (the default) or ``infer``. ``--together`` runs several such cases at once, each
in its own process forked from this one after it has imported the stages (TensorFlow's import, most
of a small case's cost, is paid once; nothing of TensorFlow has run before the fork). CASES.json is
a list of {"signal", "target", "mode", "stage", "args", "env", "stderr"}: each case's stderr goes to
that file. It prints {stderr file: exit code} as JSON, a signal's death as minus its number, as
``subprocess`` reports it.

The first call of the named function sends SIGNAL to this process from inside it, so the moment
is an event in the program, not a guess in seconds that a fast or slow machine would break.
``raise`` lets the signal's exception go where it goes; ``swallow`` catches it right there, as an
``except Exception`` in MLflow or TensorFlow's own error translation did when a SIGTERM arrived
while a model was being logged, then carries on with the real call.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
import traceback
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


def run(signame: str, target: str, mode: str, stage: str, stage_args: list[str]) -> None:
    assert mode in ("raise", "swallow") and stage in ("train", "infer"), __doc__
    arm(target, signal.Signals[signame], swallow=mode == "swallow")
    module = importlib.import_module(f"steps.{stage}")
    from steps.core import cli

    cli.main(getattr(module, stage), f"{stage}, with a signal at a chosen moment", module.OVERRIDES, argv=stage_args)


def together(cases: list[dict]) -> dict[str, int]:
    """Fork one process per case, all at once; wait for them all; each one's exit code."""
    for stage in {case["stage"] for case in cases}:
        importlib.import_module(f"steps.{stage}")
    children = {}
    for case in cases:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the case's own process: its environment, its stderr, then the stage
            code = 1
            try:
                os.environ.update(case["env"])
                err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(err, 2)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                run(case["signal"], case["target"], case["mode"], case["stage"], case["args"])
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = case["stderr"]
    codes = {}
    for pid, stderr in children.items():
        _, status = os.waitpid(pid, 0)
        codes[stderr] = os.waitstatus_to_exitcode(status)
    return codes


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if sys.argv[1] == "--together":
        print(json.dumps(together(json.loads(Path(sys.argv[2]).read_text()))))
    else:
        signame, target, mode, *rest = sys.argv[1:]
        stage = rest.pop(0) if rest[0] != "--" else "train"
        dash, *stage_args = rest
        assert dash == "--", __doc__
        run(signame, target, mode, stage, stage_args)
