"""Apple silicon's set-up, checked from Linux: a Metal plugin that fails to load costs one line, not the
import; the workflow's self-hosted job caches, tests and takes the tracking URI; the requirements
resolve for macOS arm64.

No Mac runs here. The plugin failure is simulated as TensorFlow meets it: a library in a
``site-packages/tensorflow-plugins`` folder that does not load.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mac_requirements
import pytest
import yaml
from packaging.requirements import Requirement

from helpers import PROJECT_DIR

pytestmark = pytest.mark.unit

WORKFLOW = PROJECT_DIR / ".github" / "workflows" / "mlops.yml"


def with_broken_plugin(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python that finds a plugin folder whose library does not load (a wrong build)."""
    site = tmp_path / "site-packages"  # TensorFlow looks for plugins in every sys.path entry so named
    (site / "tensorflow-plugins").mkdir(parents=True)
    (site / "tensorflow-plugins" / "libmetal_plugin.so").write_bytes(b"not a shared library, as a mismatched build")
    env = {**os.environ, "PYTHONPATH": f"{PROJECT_DIR}{os.pathsep}{site}"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_metal_plugin_that_fails_to_load_costs_one_line_and_tensorflow_runs_on_the_cpu(tmp_path):
    done = with_broken_plugin(tmp_path, "from steps import accelerator; print(accelerator.describe())")
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: the TensorFlow plugin")]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert f"{tmp_path / 'site-packages' / 'tensorflow-plugins'} did not load (" in warnings[0]
    assert warnings[0].endswith("running on the CPU. tensorflow-metal must suit the installed TensorFlow: "
                                "pip install -U tensorflow-metal, or pip uninstall tensorflow-metal")  # fmt: skip
    described = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"TensorFlow 2\.\d+\.\d+ on CPU:0; a plugin did not load, see the warning above \(1\)", described
    )

    # Without the guard, the same plugin takes `import tensorflow` down: the simulation is the real failure.
    bare = with_broken_plugin(tmp_path / "bare", "import tensorflow")
    assert bare.returncode != 0 and "libmetal_plugin.so" in bare.stderr


def test_the_self_hosted_job_caches_tests_then_runs_and_takes_the_tracking_uri():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in on and "workflow_dispatch" in on
    job = workflow["jobs"]["macos-arm64"]
    assert job["runs-on"] == ["self-hosted", "macOS", "ARM64"]
    assert "push" in job["if"] and "workflow_dispatch" in job["if"]  # every push, never a fork's pull request
    assert job["concurrency"]["cancel-in-progress"] is True and "github.ref" in job["concurrency"]["group"]

    steps = job["steps"]
    runs = [step.get("run", "") for step in steps]

    def first(text: str) -> int:
        return next(i for i, run in enumerate(runs) if text in run)

    # A venv outside the workspace, keyed on the requirement files; the log says hit or miss.
    where = runs[first("VENV=")]
    assert "hashFiles('requirements.txt', 'requirements-dev.txt', 'python_env.yaml')" in where
    assert where.startswith('echo "VENV=$RUNNER_TOOL_CACHE/') and where.endswith('>> "$GITHUB_ENV"')
    cache = runs[first("cache hit")]
    assert "cache miss" in cache and 'make venv PYTHON=python3 VENV="$VENV"' in cache
    assert first("VENV=") < first("cache hit") < first("make test")
    assert all('VENV="$VENV"' in run for run in runs if run.startswith("make "))  # every make uses it
    # The tracking URI from the repository's secret, written to .env, else the store kept on the runner
    # (tests/e2e/test_ci_store.py runs that step).
    uri = steps[first(".env")]
    assert uri["env"] == {"TRACKING_URI": "${{ secrets.MLFLOW_TRACKING_URI }}"}
    assert 'echo "MLFLOW_TRACKING_URI=$TRACKING_URI" > .env' in uri["run"]
    assert "-m steps.mlflow_io.store --dir=" in uri["run"] and "--env_file=.env" in uri["run"]
    # Tests before the pipeline, the pipeline before the upload.
    assert (
        first("make test")
        < first("make run")
        < next(i for i, s in enumerate(steps) if "upload-artifact" in s.get("uses", ""))
    )
    assert first(".env") < first("make run")


def test_the_macs_requirement_set_has_one_tensorflow_and_the_metal_plugin():
    """What `make lint` then resolves for macOS arm64 (tests/mac_requirements.py, with the index)."""
    lines = mac_requirements.mac_set((PROJECT_DIR / "requirements.txt").read_text())
    names = {Requirement(line).name for line in lines}
    assert "tensorflow" in names and "tensorflow-metal" in names and "tensorflow-macos" not in names
    linux = [
        line for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines() if line.startswith("tensorflow")
    ]
    assert linux[0] == "tensorflow==2.21.0" and lines.count("tensorflow==2.21.0") == 1  # one line, no marker
    assert mac_requirements.mac_set('x==1; sys_platform == "linux"\ny==2; platform_machine == "arm64"') == ["y==2"]


def test_a_model_trained_on_a_mac_installs_where_it_is_served(monkeypatch):
    from steps.served import packaging

    monkeypatch.setattr(packaging, "version", lambda name: "1.2.0" if name == "tensorflow-metal" else "9.9")
    required = packaging.model_requirements()
    assert 'tensorflow-metal==1.2.0; sys_platform == "darwin" and platform_machine == "arm64"' in required
    assert "tensorflow==9.9" in required  # the same TensorFlow everywhere
    assert all(Requirement(line).marker is None for line in required if not line.startswith("tensorflow-metal"))
