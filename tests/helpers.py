"""Helpers for tests and benchmarks that run the project as users do: `mlflow run` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp_path: Path, backend: str, *extra: str, env: dict[str, str] | None = None):
    """`mlflow server` on a free loopback port, as `make server` starts it; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"), *extra]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, **(env or {})}
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                    break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield uri
        finally:
            process.terminate()
            process.wait(timeout=30)
