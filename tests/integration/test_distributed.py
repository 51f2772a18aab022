"""train on two workers as separate processes on 127.0.0.1 (steps.network.distributed): one run, the
same weights on both, a single process's metrics; a worker killed or hung fails the run in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from helpers import PROJECT_DIR

# A chief as `python -m steps.train` would be, with one change the command line cannot make: set
# small without dropout, whose masks each worker draws for its own images, and in batches of 8;
# float32, since bfloat16 rounds a split batch otherwise than a whole one (0.03 in the loss, measured).
CHIEF = """
import dataclasses, json, sys
from steps import train
from steps.core.cli import main
from steps.core.loader import load_config
values = json.loads(sys.argv[1])
def run(_):
    config = load_config(values)
    small = dataclasses.replace(config.hparam_sets["small"], dropout=0.0, batch_size=8)
    return train.train(dataclasses.replace(config, hparam_sets={**config.hparam_sets, "small": small}))
main(run, "a test's chief", {}, argv=[])
"""
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
TOLERANCE = 1e-4  # the workers' sums arrive in another order than one process's: float rounding only


def chief(tiny_data: Path, tmp_path: Path, workers: int, **more: str) -> subprocess.Popen:
    values = {"data.dir": str(tiny_data), "train.hparams": "small", "train.image_size": "32", "train.epochs": "3",
              "train.exports": "none", "train.workers": str(workers), "experiment": f"w{workers}",
              "train.precision": "float32", **more}  # fmt: skip
    env = {**os.environ, "DEFECT_CACHE_DIR": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-c", CHIEF, json.dumps(values)], cwd=PROJECT_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def train_runs(experiment: str) -> list:
    found = mlflow.get_experiment_by_name(f"train/{experiment}")
    return mlflow.search_runs([found.experiment_id], output_format="list") if found else []


def history(run_id: str) -> dict[str, list[float]]:
    client = mlflow.MlflowClient()
    return {m: [p.value for p in sorted(client.get_metric_history(run_id, m), key=lambda p: p.step)]
            for m in EPOCH_METRICS}  # fmt: skip


pytestmark = [pytest.mark.slow, pytest.mark.model]


def test_two_workers_train_as_one_process_does_and_only_the_chief_logs(tiny_data, tmp_path, store):
    outputs = {}
    processes = {workers: chief(tiny_data, tmp_path, workers, **{"train.worker_timeout": "120"}) for workers in (1, 2)}
    for workers, process in processes.items():
        outputs[workers] = process.communicate(timeout=300)[0]
        assert process.returncode == 0, outputs[workers][-3000:]
    # One train run with one child on two workers, as on one.
    single, double = train_runs("w1"), train_runs("w2")
    assert len(single) == len(double) == 2
    assert {r.info.status for r in double} == {"FINISHED"}
    child = {
        w: next(r for r in runs if r.data.tags.get("mlflow.parentRunId")) for w, runs in ((1, single), (2, double))
    }
    # Both workers ended with the same weights (each logs their digest).
    digests = dict(re.findall(r"worker (\d): cnn trained, weights ([0-9a-f]{16})", outputs[2]))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], outputs[2][-3000:]
    # Every epoch's metrics within rounding of the single process with the same global batch (8).
    one, two = history(child[1].info.run_id), history(child[2].info.run_id)
    for name in EPOCH_METRICS:
        assert len(one[name]) == len(two[name]) == 3, name
        assert max(abs(a - b) for a, b in zip(one[name], two[name], strict=True)) < TOLERANCE, (name, one, two)
    assert child[1].data.metrics["best_val_accuracy"] == pytest.approx(child[2].data.metrics["best_val_accuracy"])


def _wait_for(process: subprocess.Popen, pattern: str, lines: list[str], seconds: float) -> re.Match:
    deadline = time.monotonic() + seconds
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no {pattern!r} in:\n{''.join(lines)[-3000:]}")


def test_a_killed_worker_fails_the_run_in_one_line_within_the_timeout(tiny_data, tmp_path, store):
    timeout = 15
    process = chief(tiny_data, tmp_path, 2, **{"train.epochs": "400", "train.worker_timeout": str(timeout)})
    lines: list[str] = []
    pid = None
    try:
        pid = int(_wait_for(process, r"started worker 1 of 2 \(pid (\d+)\)", lines, 120).group(1))
        _wait_for(process, r"worker 0 epoch 1:", lines, 180)  # training is under way
        os.kill(pid, signal.SIGKILL)
        lost = time.monotonic()
        said = _wait_for(process, r"^error: ", lines, timeout + 60)
        failed_after = time.monotonic() - lost
        rest = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines) + rest
    assert process.returncode == 7, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [said.string.rstrip("\n")] and "Traceback" not in output, output[-3000:]
    assert errors[0].startswith("error: worker 0 of 2 lost the others while training cnn ("), errors[0]
    # TensorFlow's heartbeats notice a dead (or stopped) worker within about ten seconds; a collective
    # that waits longer than worker_timeout fails in any case. The run is closed before the line is said.
    assert failed_after < timeout + 10, (failed_after, errors[0])
    runs = train_runs("w2")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}  # none left RUNNING
