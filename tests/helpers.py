"""Helpers for tests and benchmarks that run the project as users do: `mlflow run` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]


def mlflow_run(
    entry_point: str,
    params: dict[str, str],
    store: str,
    experiment: str | None = None,
    check: bool = False,
    env_manager: str = "local",
) -> subprocess.CompletedProcess:
    """`mlflow run . -e ENTRY --env-manager local` against ``store``; output captured unless ``check``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the stages' `python`
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", env_manager]
    if experiment:
        cmd += ["--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    if check:  # benchmarks: let the output stream, fail loudly
        return subprocess.run(cmd, env=env, check=True, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
