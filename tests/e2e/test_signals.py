"""A stop signal is never lost: SIGTERM at any moment of a training ends it with 143 and KILLED runs.

Each case sends the signal from inside the program at a named event (``tests/signal_at.py``), so
the moment does not depend on how fast the machine is. Each case is a process of its own, forked
from one that has imported the stage. ``swallow`` cases catch the signal's
exception where it arrives, as work under way did (MLflow's input-example validation catching
what TensorFlow made of it): the stage must stop all the same.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from helpers import PROJECT_DIR, empty_store

pytestmark = [pytest.mark.model, pytest.mark.slow]

STOPPED = "error: stopped by SIGTERM; any run it had started is marked KILLED"
# (where the signal arrives, what happens to its exception, which runs exist by then)
MOMENTS = [
    ("steps.train:load_split", "raise", "none"),  # start-up: decoding, before any run
    ("steps.train:log_dataset", "raise", "parent"),  # the parent run open, no child yet
    (
        "steps.network.training:EpochLogger.on_epoch_begin",
        "swallow",
        "child",
    ),  # inside an epoch: the next batch stops it
    ("steps.network.training:operating_point", "raise", "child"),  # evaluating on the validation split
    ("mlflow.pyfunc:log_model", "raise", "child"),  # logging the model
    ("keras.saving:load_model", "swallow", "child"),  # inside log_model: MLflow's validation loads it
    ("steps.train:pick_best", "swallow", "children done"),  # every set trained, the parent still open
]


def case(tiny_data: Path, tmp_path: Path, target: str, mode: str) -> dict:
    """A training against its own store that signals itself at ``target`` (``tests/signal_at.py``)."""
    name = target.replace(":", "_")
    return {"signal": "SIGTERM", "target": target, "mode": mode, "stage": "train",
            "args": ["--data_dir", str(tiny_data), "--hparams", "small", "--epochs", "1", "--image_size", "32",
                     "--experiment", "sig", "--exports", "none"],
            "env": {"MLFLOW_TRACKING_URI": empty_store(tmp_path / (name + ".db"))},
            "stderr": str(tmp_path / (name + ".stderr"))}  # fmt: skip


def test_sigterm_at_every_moment_exits_143_and_leaves_no_run_running(tiny_data, tmp_path):
    # All at once, each a process of its own forked after TensorFlow's import, which is most of a case.
    cases = [case(tiny_data, tmp_path, target, mode) for target, mode, _ in MOMENTS]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "tests" / "signal_at.py"), "--together", str(tmp_path / "cases.json")],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    for (target, mode, stage), spec in zip(MOMENTS, cases, strict=True):
        stderr, code = Path(spec["stderr"]).read_text(), codes[spec["stderr"]]
        store = spec["env"]["MLFLOW_TRACKING_URI"]
        assert f"signal_at: SIGTERM at {target}" in stderr, f"{target}: the moment never came\n{stderr[-3000:]}"
        assert code == 128 + signal.SIGTERM, f"{target} ({mode}): exit {code}\n{stderr[-3000:]}"
        assert stderr.strip().splitlines()[-1] == STOPPED, target
        client = mlflow.MlflowClient(store)
        experiment = client.get_experiment_by_name("train/sig")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        statuses = sorted(r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags)
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert "RUNNING" not in {r.info.status for r in runs}, target
        if stage == "none":
            assert not runs, target
            continue
        assert statuses == ["KILLED"], f"{target}: parent {statuses}"  # the stage never ends FINISHED
        if stage == "parent":
            assert not children, target
        elif stage == "child":  # the set being trained was killed
            assert [c.info.status for c in children] == ["KILLED"], target
        else:
            assert [c.info.status for c in children] == ["FINISHED"], target
