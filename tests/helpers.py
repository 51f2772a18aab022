"""Helpers for tests and benchmarks that run the project as users do: `mlflow run` in a subprocess."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
from PIL import Image

from steps.core import contract
from steps.datasets.elpv import elpv_labels, elpv_split
from steps.served.serving import MAX_PIXELS

PROJECT_DIR = Path(__file__).resolve().parents[1]

# Small enough that one epoch of all three sets takes seconds; big enough that each class shows
# up in the validation split.
TINY_PER_CLASS = {"train": 12, "test": 6}
TINY_SIZE = 48


def make_tiny_elpv(root: Path, per_class: dict[str, int] = TINY_PER_CLASS, size: int = TINY_SIZE) -> Path:
    """Real ELPV cells, downscaled, laid out as <root>/{train,test}/{def_front,ok_front}/, with the
    ``manifest.csv`` of those files that ``prepare`` writes for the full set."""
    plan = elpv_split(elpv_labels(), ("ok_front", "def_front"))
    chosen = pd.concat(group.head(per_class[split]) for (split, _cls), group in plan.groupby(["split", "class"]))
    for row in chosen.itertuples():
        target = root / row.file
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(row.source) as image:
            image.resize((size, size), Image.Resampling.BILINEAR).save(target)
    chosen.drop(columns="source").to_csv(root / "manifest.csv", index=False)
    return root


def mlflow_run_command(
    entry_point: str, params: dict[str, str], store: str, experiment: str | None = None, env_manager: str = "local"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `mlflow run . -e ENTRY --env-manager local` against ``store``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the stages' `python`
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", env_manager]
    if experiment:
        cmd += ["--experiment-name", experiment]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    return cmd, env


def mlflow_run(
    entry_point: str,
    params: dict[str, str],
    store: str,
    experiment: str | None = None,
    check: bool = False,
    env_manager: str = "local",
) -> subprocess.CompletedProcess:
    """Run `mlflow run` (``mlflow_run_command``) to the end; output captured unless ``check``."""
    cmd, env = mlflow_run_command(entry_point, params, store, experiment, env_manager)
    if check:  # benchmarks: let the output stream, fail loudly
        return subprocess.run(cmd, env=env, check=True, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def mlflow_runs_at_once(*runs: tuple[str, dict[str, str], str, str | None]) -> list[subprocess.CompletedProcess]:
    """Several `mlflow run`s (entry point, params, store, experiment) started together; each one's result.

    For runs that do not depend on each other: on two cores they overlap their start-up (about
    10 s of imports each) instead of paying it one after the other.
    """
    started = []
    for entry_point, params, store, experiment in runs:
        cmd, env = mlflow_run_command(entry_point, params, store, experiment)
        started.append((cmd, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results = []
    for cmd, process in started:
        stdout, stderr = process.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr))
    return results


# The folder this test session's workers share (conftest.py sets it; pytest-xdist gives each worker
# a folder of its own below it). None outside pytest, in the benchmarks.
SESSION_DIR: Path | None = None


def once_per_session(name: str, build: Callable[[Path], None]) -> Path:
    """``SESSION_DIR/name``, filled by ``build(folder)`` once a session: the first worker to need it
    builds it, under a lock, and the others wait and use it."""
    assert SESSION_DIR is not None, "conftest.py sets SESSION_DIR"
    root = SESSION_DIR / name
    with open(SESSION_DIR / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the worker dies
        done = root / ".built"
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed part-way
            root.mkdir(parents=True)
            build(root)
            done.touch()
    return root


def empty_store(db: Path) -> str:
    """A new SQLite store at ``db`` with MLflow's tables in it; its URI.

    A copy of one empty store made once a session: MLflow's table creation and schema migrations
    cost over a CPU-second a store, a copy hundredths (`make bench-store`, BENCHMARKS.md), and the
    suite makes dozens. Outside pytest, made in place.
    """
    from steps.mlflow_io.tracking import create_sqlite_store

    uri = f"sqlite:///{db}"
    db.parent.mkdir(parents=True, exist_ok=True)
    if SESSION_DIR is None:
        create_sqlite_store(uri)
        return uri
    template = once_per_session("empty_store", lambda root: create_sqlite_store(f"sqlite:///{root / 'mlflow.db'}"))
    shutil.copy(template / "mlflow.db", db)
    return uri


@contextlib.contextmanager
def building_store(root: Path):
    """Make ``root/mlflow.db`` the store while a module fixture fills it; yields its path.

    Tests then each work on a copy (``use_copy_of``); the artifacts stay where they were written.
    """
    from steps.mlflow_io.tracking import configure

    patch = pytest.MonkeyPatch()
    patch.setenv("MLFLOW_TRACKING_URI", empty_store(root / "mlflow.db"))
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    configure()
    try:
        yield root / "mlflow.db"
    finally:
        patch.undo()


def use_copy_of(db: Path, tmp_path: Path, monkeypatch) -> str:
    """This test's own copy of a store built by ``building_store``, made current (environment too)."""
    import mlflow

    shutil.copy(db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def wait_for_epochs(client, experiment: str, runs: int, *processes: subprocess.Popen) -> None:
    """Wait until ``runs`` runs of ``experiment`` have logged a training epoch (or a process has exited)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        found = client.get_experiment_by_name(experiment)
        if found and len(client.search_runs([found.experiment_id], "metrics.loss > -1")) >= runs:
            return
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url`` until it answers; False if ``process`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """A benchmark's repeats as ``median (lowest–highest)``."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def publish(text: str, begin: str, end: str, write: bool, quick: bool) -> None:
    """Print a benchmark's section; with ``write``, put it in BENCHMARKS.md, unless it is a quick
    smoke check, whose figures must not replace measured ones."""
    print(text)
    if write and quick:
        print("(a --quick run is a smoke check: BENCHMARKS.md keeps its measured figures)")
    elif write:
        replace_section(PROJECT_DIR / "BENCHMARKS.md", begin, end, text)


def replace_section(path: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) in place of that section of ``path``."""
    current = path.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: text, current) if pattern.search(current) else current + "\n" + text + "\n")


@contextlib.contextmanager
def running_server(
    tmp_path: Path, backend: str, *extra: str, env: dict[str, str] | None = None, port: int | None = None
):
    """`mlflow server` on loopback (a free port unless given), as `make server` starts it; yields its URI."""
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend, "--artifacts-destination", str(tmp_path / "artifacts"), *extra]  # fmt: skip
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        # No job runner: MLflow 3's server starts two job-queue consumer processes for its GenAI
        # jobs, which this pipeline never submits, at a few CPU-seconds each per start.
        server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=server_env)
        try:
            if not wait_until_up(f"{uri}/health", process, timeout=90):
                pytest.fail("mlflow server did not start:\n" + log_path.read_text()[-3000:])
            yield uri
        finally:
            process.terminate()
            process.wait(timeout=30)


def assert_store_consistent(client) -> None:
    """What a crash or a refusal must never leave behind in a store.

    No run still RUNNING; every registered version points back to a finished eval run; every alias
    names a version that exists.
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
    assert not running, f"runs left RUNNING: {[r.info.run_id for r in running]}"
    for model in client.search_registered_models():
        versions = {str(v.version): v for v in client.search_model_versions(f"name = '{model.name}'")}
        for alias, version in model.aliases.items():
            assert str(version) in versions, f"{model.name}@{alias} names version {version}, which does not exist"
        for number, version in versions.items():
            eval_run_id = version.tags.get(contract.VERSION_TAG_EVAL_RUN_ID)
            assert eval_run_id, f"{model.name} version {number} has no eval run"
            eval_run = client.get_run(eval_run_id)
            assert eval_run.info.status == "FINISHED", f"{model.name} version {number}: eval run {eval_run.info.status}"
            evaluations = contract.experiment_name(contract.STAGE_EVAL, "")
            assert client.get_experiment(eval_run.info.experiment_id).name.startswith(evaluations)


# --- Bad image files, one of each kind a stage must refuse with its reason --------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def real_png(tiny_data: Path) -> bytes:
    """A real ELPV cell's PNG bytes, to break."""
    return sorted((tiny_data / "train" / "def_front").glob("*.png"))[0].read_bytes()


# kind -> (the file's bytes, made from a real ELPV cell where it matters; what every stage says)
BAD_FILES = {
    "corrupt": (
        lambda real: real[:100] + bytes(b ^ 0x5A for b in real[100:-20]) + real[-20:],
        "corrupt or truncated image data (OSError: broken data stream when reading image file)",
    ),
    "truncated": (
        lambda real: real[: len(real) // 2],
        "corrupt or truncated image data (OSError: image file is truncated)",
    ),
    "zero_byte": (lambda real: b"", "empty file (0 bytes)"),
    "not_an_image": (
        lambda real: b"cell,label\ncell0001,defect\n",
        "not a PNG, JPEG, BMP, TIFF, GIF or WebP image (27 bytes); no other format is read",
    ),
    # 9000 x 9000 one-bit pixels: 10 KB on disk, 81 MP (and 648 MB as float32) once decoded.
    "decompression_bomb": (
        lambda real: encode(Image.new("1", (9000, 9000)), "PNG"),
        f"9000x9000 is 81,000,000 pixels, more than the limit of {MAX_PIXELS:,}",
    ),
    "float_pixels": (
        lambda real: encode(Image.new("F", (16, 16), 0.5), "TIFF"),
        "32-bit float pixels have no fixed range",
    ),
}
SUFFIX = {"float_pixels": ".tif"}


def write_bad(kind: str, folder: Path, real: bytes) -> Path:
    make, _ = BAD_FILES[kind]
    path = folder / f"bad_{kind}{SUFFIX.get(kind, '.png')}"
    path.write_bytes(make(real))
    return path


def without_spark_connect() -> None:
    """Make ``import pyspark.sql.connect.dataframe`` fail at once where it would fail anyway.

    ``make test`` runs the suite in pytest-xdist workers, started as ``python -c``, and
    test_concurrency spawns processes from them: their ``__main__`` has no file, which pyspark's
    Spark Connect module takes for a doctest run and answers with ``sys.exit(0)`` when MLflow imports
    it to look for Spark data frames. Where Spark Connect's own dependencies are missing, that import
    fails with ImportError outside xdist, and MLflow takes that as "no Spark data frame".
    """
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is not None or hasattr(main, "__file__"):
        return
    try:
        from pyspark.testing.connectutils import should_test_connect
    except ImportError:  # no pyspark: nothing imports Spark Connect
        return
    if not should_test_connect:
        sys.modules["pyspark.sql.connect.dataframe"] = None  # type: ignore[assignment]


def in_process_stages(monkeypatch, calls: list | None = None) -> None:
    """Make ``steps.main`` run each stage in-process: from the command line main builds for it, in a
    thread of its own (MLflow's active run is per thread, as it is per process under `mlflow run`),
    tagged with its fingerprint as ``main.run_stage`` tags it. ``calls`` collects (stage, parameters,
    env_manager) of every stage run."""
    import importlib
    import threading

    import mlflow

    from steps import main
    from steps.core import cli, contract
    from steps.core.errors import PipelineError

    own = {"evaluate": ("run_id",)}

    def run_stage(stage, parameters, config, env_manager, fingerprint):
        if calls is not None:
            calls.append((stage, dict(parameters), env_manager))
        argv = [f"--{name}={value}" for name, value in parameters.items()]
        name, result = main.ENTRY_POINTS[stage], {}
        module = importlib.import_module(f"steps.{name}")  # entry point, module and function share a name
        step = getattr(module, name)

        def stage() -> None:
            try:
                result["run_id"] = cli.main(step, "", module.OVERRIDES, argv=argv, own=own.get(name, ()))
            except SystemExit as stop:  # what the stage's process would have exited with
                result["exit"] = stop.code

        worker = threading.Thread(target=stage)
        worker.start()
        worker.join()
        if "run_id" not in result:
            raise PipelineError(f"the {name} stage failed (exit {result.get('exit')})")
        mlflow.MlflowClient().set_tag(result["run_id"], contract.TAG_FINGERPRINT, fingerprint)
        return result["run_id"]

    monkeypatch.setattr(main, "run_stage", run_stage)


WORKFLOW = PROJECT_DIR / ".github" / "workflows" / "mlops.yml"


def macos_steps() -> list[dict]:
    """The self-hosted job's steps, as the workflow declares them."""
    import yaml

    return yaml.safe_load(WORKFLOW.read_text())["jobs"]["macos-arm64"]["steps"]


def step_running(text: str) -> str:
    """The script of the self-hosted job's one step whose script contains ``text``."""
    (script,) = [s["run"] for s in macos_steps() if text in s.get("run", "")]
    return script


def benchmark(name: str):
    """A benchmark module of tests/benchmarks (``make bench*`` runs them), loaded from its file: the
    suite checks their quick modes without putting that folder on its import path."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    folder = PROJECT_DIR / "tests" / "benchmarks"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(folder))  # while it loads: benchmarks import each other, as scripts do
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


class SparkCluster(NamedTuple):
    master: str  # spark://127.0.0.1:<port>
    work_dirs: list[Path]  # one per worker: work/<app ID>/<executor ID>/stderr


@contextlib.contextmanager
def spark_cluster(root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
    """A standalone Spark master and ``workers`` workers on 127.0.0.1, started from the jars and
    ``bin/spark-class`` that the pyspark package ships; stopped (and waited for) on exit."""
    import json

    import pyspark

    home = Path(pyspark.__file__).parent
    env = {**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(root / "logs")}
    spark_class = [str(home / "bin" / "spark-class")]
    port, ui = free_port(), free_port()
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> subprocess.Popen:
        handle = (root / f"{log}.log").open("w")
        process = subprocess.Popen(spark_class + args, env=env, stdout=handle, stderr=subprocess.STDOUT)
        started.append(process)
        return process

    root.mkdir(parents=True, exist_ok=True)
    try:
        master = start(["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                        "--webui-port", str(ui)], "master")  # fmt: skip
        if not wait_until_up(f"http://127.0.0.1:{ui}/json/", master, 120):
            raise RuntimeError(f"the Spark master did not start: {(root / 'master.log').read_text()[-2000:]}")
        work_dirs = [root / f"worker{i}" for i in range(workers)]
        for i, work in enumerate(work_dirs):
            start(["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores", str(cores),
                   "--memory", memory, "--work-dir", str(work), "--webui-port", str(free_port()),
                   f"spark://127.0.0.1:{port}"], f"worker{i}")  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # until every worker has registered with the master
            with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=5) as answer:
                alive = json.load(answer).get("aliveworkers", 0)
            if alive >= workers:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in started):
                raise RuntimeError(f"{alive} of {workers} Spark workers registered; see {root}/worker*.log")
            time.sleep(0.5)
        yield SparkCluster(f"spark://127.0.0.1:{port}", work_dirs)
    finally:
        for process in reversed(started):
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def tasks_run(work_dir: Path) -> int:
    """How many tasks the executors a Spark worker started ran (their logs' "Running task" lines)."""
    return sum(log.read_text(errors="replace").count("Running task") for log in work_dir.glob("*/*/stderr"))


def without_memory(metrics: dict[str, float]) -> dict[str, float]:
    """A run's metrics but the memory figures every finished run logs, which are checked to be there."""
    from steps.core import contract

    assert metrics[contract.METRIC_PEAK_RSS_MB] > 0
    assert sys.platform != "linux" or metrics[contract.METRIC_PEAK_ANON_MB] > 0
    return {k: v for k, v in metrics.items() if k not in (contract.METRIC_PEAK_ANON_MB, contract.METRIC_PEAK_RSS_MB)}
