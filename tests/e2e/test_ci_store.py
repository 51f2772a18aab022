"""End to end: the workflow's own store step, run twice in a clone of the repository that ``git clean -ffdx``
wipes in between, as ``actions/checkout`` does, each time followed by a tiny ``make run`` and the upload step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest

from helpers import PROJECT_DIR, step_running
from steps.core import contract
from steps.mlflow_io import store


def clone_of_the_project(target: Path) -> Path:
    """A git repository holding this working tree's files (committed or not), as a CI checkout holds them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = PROJECT_DIR / name
        if source.is_file() and ".ci/node_modules" not in name:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.org"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "checkout"]):
        subprocess.run([*git, *args], cwd=target, check=True, capture_output=True)
    return target


def read_github_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.mark.e2e
def test_the_store_step_twice_with_the_workspace_wiped_between_keeps_the_registry(tmp_path, tiny_data):
    clone = clone_of_the_project(tmp_path / "workspace")
    venv = Path(sys.executable).parent.parent
    home = tmp_path / "runner-home"
    github_env = tmp_path / "github_env"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DEFECT_CI_"))}
    env |= {"HOME": str(home), "VENV": str(venv), "GITHUB_REPOSITORY": "acme/defects", "GITHUB_ENV": str(github_env),
            "TRACKING_URI": "", "RUNNER_TEMP": str(tmp_path / "runner-temp")}  # fmt: skip
    tiny = ["-P data_dir=" + str(tiny_data), "-P hparams=small", "-P epochs=1", "-P image_size=32", "-P exports=none",
            "-P threshold=0.0", "-P promote=true"]  # fmt: skip

    def workflow_run(*more: str) -> dict[str, str]:
        subprocess.run(["git", "clean", "-ffdx", "-q"], cwd=clone, check=True)  # actions/checkout's default
        shutil.rmtree(tmp_path / "runner-temp", ignore_errors=True)  # a runner's temporary folder is the job's
        github_env.write_text("")
        script = step_running("-m steps.mlflow_io.store --dir=")
        prepared = subprocess.run(["bash", "-e", "-c", script], cwd=clone, env=env, capture_output=True, text=True)
        assert prepared.returncode == 0, prepared.stderr[-3000:]
        assert "tracking store: sqlite:///" in prepared.stdout  # the log says where
        step_env = {**env, **read_github_env(github_env)}
        args = " ".join([*tiny, f"-P output={tmp_path / 'predictions.csv'}", *more])
        ran = subprocess.run(["make", "-o", f"{venv}/bin/.installed", "run", f"VENV={venv}", f"ARGS={args}"],
                             cwd=clone, env=step_env, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-3000:]
        collected = subprocess.run(["bash", "-e", "-c", step_running("store collect")], cwd=clone, env=step_env,
                                   capture_output=True, text=True)  # fmt: skip
        assert collected.returncode == 0, collected.stderr[-3000:]
        return step_env

    first = workflow_run()
    # Training is found in the kept store and reused; evaluate runs again (another parameter) and
    # registers version 2, which it compares with version 1.
    second = workflow_run("-P min_improvement=0.01")

    folder = home / ".defect-detection" / "ci-stores" / "acme" / "defects"
    assert first["STORE"] == second["STORE"] == str(folder)
    client = mlflow.MlflowClient(store.store_uri(folder))
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'Production_Reg'"))
    assert versions == [1, 2]
    evaluations = client.search_runs([client.get_experiment_by_name("eval/defect-detection").experiment_id])
    (evaluation,) = [r for r in evaluations if r.data.tags.get(contract.TAG_REGISTERED_VERSION) == "2"]
    assert evaluation.data.tags[contract.TAG_CHAMPION_VERSION] == "1"  # the second run compared with the first
    assert len(list((folder / "backups").glob("mlflow-*.db"))) == 1  # the second run backed up the first's store
    for experiment in client.search_experiments():
        location = Path(unquote(urlparse(experiment.artifact_location).path))
        assert location.is_relative_to(folder) and not location.is_relative_to(clone), experiment.name
    assert not (clone / "mlruns").exists() and not (clone / "mlflow.db").exists()
    upload = tmp_path / "runner-temp" / "store-upload"  # the second run's: only its runs' artifacts
    assert (upload / "mlflow.db").is_file()
    copied = {p.name for p in (upload / "mlruns").glob("*/*")}  # run and model folders, by ID
    first_eval = next(
        r for r in client.search_runs([evaluation.info.experiment_id]) if r.info.run_id != evaluation.info.run_id
    )
    assert evaluation.info.run_id in copied and first_eval.info.run_id not in copied
