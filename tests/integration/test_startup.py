"""What an entry point's process sets up before its step runs (``steps/__init__.py``), in new Pythons."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import steps
from helpers import PROJECT_DIR

pytestmark = pytest.mark.model  # processes of their own, importing the package

SHOW = "import gc; print('thresholds', gc.get_threshold())\n"


def thresholds(*args: str) -> tuple[int, ...]:
    """The collector's thresholds a new Python started with ``args`` has once they have run."""
    # -i: after the module ran, the interpreter reads SHOW from stdin in the same process.
    done = subprocess.run([sys.executable, "-i", *args], input=SHOW, capture_output=True, text=True, cwd=PROJECT_DIR)
    found = re.search(r"thresholds \(([\d, ]+)\)", done.stdout)
    assert found, done.stdout + done.stderr
    return tuple(int(n) for n in found[1].split(","))


def test_an_entry_point_runs_the_collector_less_often_and_an_importer_keeps_its_own_thresholds():
    assert thresholds("-m", "steps.core.contract") == steps.ENTRY_POINT_GC_THRESHOLDS  # as `python -m steps.<name>`
    # A process that imports steps otherwise (a server loading the model's code) keeps Python's defaults.
    assert thresholds("-c", "import steps") == thresholds("-c", "pass")
