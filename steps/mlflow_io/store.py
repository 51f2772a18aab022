"""A SQLite store that lasts: kept outside a workspace that is wiped, backed up and upgraded before
each run, its old models' files pruned by a retention rule, and the part one run wrote collected.

CI's self-hosted job keeps its store in a folder of its own, one per repository, because
``actions/checkout`` wipes the workspace before every run (docs/ci.md). Everything MLflow writes
lives in that folder: the database, and every experiment's artifacts below its ``mlruns/``,
including ``Default`` and the ``pipeline/`` experiment ``mlflow run`` would otherwise create
relative to the working directory.

``python -m steps.mlflow_io.store --dir=DIR``, before each run:

1. backs up ``DIR/mlflow.db`` to ``DIR/backups/`` (SQLite's online backup; the newest
   ``store.keep_backups`` stay);
2. runs ``mlflow db upgrade`` on it: requirements allow any MLflow 3.x, and a newer MLflow refuses
   an older schema;
3. creates what is missing (the database, ``Default`` and the pipeline's experiment, their
   artifacts beside the database) and writes ``MLFLOW_TRACKING_URI`` to ``--env_file``;
4. applies the retention rule (``prune``): of each registered model, the files of the versions that
   hold no alias and are not among its last ``store.keep_versions`` are deleted, with the models
   and exports of the training that produced them; the registry entries and their scores stay,
   and each such version is tagged ``artifacts_pruned`` (the rule never gives it ``prod``).

``python -m steps.mlflow_io.store collect --dir=DIR --since_ms=T --to=OUT`` copies the database and the
artifacts of the runs started since ``T`` into ``OUT``: what CI uploads, instead of the whole store.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from steps.core import cli, contract
from steps.core.config import Config
from steps.core.errors import PipelineError, StoreError

logger = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
BACKUPS = "backups"


def store_uri(folder: Path) -> str:
    return f"sqlite:///{(folder / DB_NAME).resolve()}"


def db_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path))


# --- Backups and the schema --------------------------------------------------------------


def backup(db: Path, keep: int, now: datetime | None = None) -> Path | None:
    """Copy ``db`` into ``<its folder>/backups/`` with SQLite's online backup (consistent while
    another process writes); keep the newest ``keep`` copies. None when there is no database yet."""
    if not db.is_file():
        return None
    folder = db.parent / BACKUPS
    folder.mkdir(exist_ok=True)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{db.stem}-{stamp}.db"
    partial = target.with_suffix(".partial")
    copy_database(db, partial)
    partial.replace(target)  # a copy cut short never passes for a backup
    for old in sorted(folder.glob(f"{db.stem}-*.db"))[:-keep]:
        old.unlink()
    return target


def copy_database(db: Path, target: Path) -> None:
    """Copy a SQLite database with SQLite's online backup: consistent while another process writes."""
    with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(target)) as copy:
        source.backup(copy)


def upgrade(uri: str, saved: Path | None) -> None:
    """``mlflow db upgrade`` on the store: the schema of the MLflow installed, whatever wrote it."""
    done = subprocess.run([sys.executable, "-m", "mlflow", "db", "upgrade", uri], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no output"]
        restore = f"; the copy made before it is {saved}" if saved else ""
        raise StoreError(f"mlflow db upgrade failed on {db_path(uri)}: {lines[-1][:300]}{restore}")


def create(uri: str, experiments: Iterable[str]) -> None:
    """The store's tables, and ``Default`` and ``experiments`` with their artifacts beside the database."""
    from steps.mlflow_io.runs import ensure_experiment
    from steps.mlflow_io.tracking import create_sqlite_store

    create_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    for name in experiments:
        ensure_experiment(name)


# --- Retention ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A registered version as the retention rule sees it."""

    name: str
    version: int
    aliases: tuple[str, ...]
    location: str  # where its files are
    pruned: bool = False
    source_run_id: str = ""  # the train run it came from


def to_prune(versions: Sequence[Held], keep_last: int) -> list[Held]:
    """The versions whose files go: no alias, not among the last ``keep_last`` of their registered
    model, not pruned already, and not sharing files with a version that stays."""
    kept: list[Held] = []
    candidates: list[Held] = []
    for name in sorted({v.name for v in versions}):
        newest_first = sorted((v for v in versions if v.name == name), key=lambda v: -v.version)
        for rank, held in enumerate(newest_first):
            (kept if held.aliases or rank < keep_last else candidates).append(held)
    staying = {v.location for v in kept}
    return [v for v in candidates if not v.pruned and v.location not in staying]


def registered(client: mlflow.MlflowClient, names: Iterable[str]) -> list[Held]:
    found = []
    for name in names:
        try:
            held_by: dict[str, list[str]] = {}
            for alias, version in client.get_registered_model(name).aliases.items():
                held_by.setdefault(str(version), []).append(alias)  # search_model_versions leaves them out
        except mlflow.exceptions.MlflowException:
            continue  # no such registered model yet
        for v in client.search_model_versions(f"name = '{name}'"):
            location = client.get_model_version_download_uri(name, v.version)
            pruned = contract.VERSION_TAG_PRUNED in v.tags
            source = v.tags.get(contract.VERSION_TAG_SOURCE_RUN_ID, "")
            found.append(Held(name, int(v.version), tuple(held_by.get(str(v.version), ())), location, pruned, source))
    return found


def training_files(client: mlflow.MlflowClient, source_run_id: str) -> list[tuple[str, str | None]]:
    """The files of the training a version came from, as ``(artifact root, path or None)``: every set's
    logged model and ``exports/`` folder, the sets of one ``train`` run being tried together."""
    try:
        source = client.get_run(source_run_id)
    except mlflow.exceptions.MlflowException:
        return []
    parent = source.data.tags.get(MLFLOW_PARENT_RUN_ID)
    runs = [source]
    if parent:
        found = client.search_runs([source.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'")
        runs = list({r.info.run_id: r for r in [source, *found]}.values())
    files: list[tuple[str, str | None]] = []
    for run in runs:
        files.append((run.info.artifact_uri, contract.EXPORTS_ARTIFACT))
        models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
        files.extend((m.artifact_location, None) for m in models)
    return files


def prune(client: mlflow.MlflowClient, names: Sequence[str], keep_last: int) -> list[Held]:
    """Apply the retention rule to the registered models ``names``; return the versions pruned."""
    versions = registered(client, names)
    going = to_prune(versions, keep_last)
    staying = {v.location for v in versions if v not in going}
    reason = f"holds no alias and is not among the last {keep_last} versions (store.keep_versions)"
    for held in going:
        files: list[tuple[str, str | None]] = [(held.location, None)]
        if held.source_run_id:
            files += training_files(client, held.source_run_id)
        for root, path in files:
            if root in staying:
                continue  # another version, which stays, is these very files
            get_artifact_repository(root).delete_artifacts(path)
        at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        client.set_model_version_tag(held.name, str(held.version), contract.VERSION_TAG_PRUNED, f"{at}: {reason}")
        logger.info("%s version %d: files pruned (%s); its entry and scores stay", held.name, held.version, reason)
    return going


# --- The step ----------------------------------------------------------------------------


def prepare(config: Config, dir: str, env_file: str = "") -> str:
    """Back up, upgrade, create and prune the store in ``dir``; write its URI to ``env_file``; return it."""
    if not dir:
        raise PipelineError("parameter dir: the folder the store lives in is required (--dir=PATH)")
    folder = Path(dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"parameter dir: cannot create {folder}: {err.strerror or err}") from None
    uri = store_uri(folder)
    saved = backup(folder / DB_NAME, config.store.keep_backups)
    if saved is not None:
        logger.info("backed up the database to %s", saved)
        upgrade(uri, saved)
    create(uri, [contract.experiment_name(contract.STAGE_PIPELINE, config.experiment)])
    reg = config.registry
    pruned = prune(mlflow.MlflowClient(uri), (reg.production, reg.testing), config.store.keep_versions)
    if env_file:
        Path(env_file).write_text(f"MLFLOW_TRACKING_URI={uri}\n")
    kept = "a new store" if saved is None else f"backed up and upgraded; {len(pruned)} versions' files pruned"
    print(f"tracking store: {uri} (kept outside the workspace: {kept})")
    return uri


def collect(config: Config, dir: str, since_ms: str, to: str) -> list[Path]:
    """Copy the database and the artifacts of every run started since ``since_ms`` (and the models
    they logged) into ``to``, keeping their paths below the store's folder; return what was copied."""
    folder = Path(dir).expanduser().resolve()
    if not (folder / DB_NAME).is_file():
        raise PipelineError(f"parameter dir: no store at {folder} ({DB_NAME} missing)")
    try:
        since = int(since_ms)
    except ValueError:
        raise PipelineError(f"parameter since_ms: expected milliseconds since the epoch, got {since_ms!r}") from None
    out = Path(to).resolve()
    out.mkdir(parents=True, exist_ok=True)
    copy_database(folder / DB_NAME, out / DB_NAME)
    client = mlflow.MlflowClient(store_uri(folder))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"attributes.start_time >= {since}", max_results=50000)
    roots = [r.info.artifact_uri for r in runs]
    for run in runs:
        models = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
        roots += [m.artifact_location for m in models]
    copied = [out / DB_NAME]
    for root in roots:
        path = Path(unquote(urlparse(root).path))
        if path.is_dir() and path.is_relative_to(folder):
            target = out / path.relative_to(folder)
            shutil.copytree(path, target, dirs_exist_ok=True)
            copied.append(target)
    print(f"collected the database and {len(copied) - 1} artifact folders of {len(runs)} runs into {out}")
    return copied


# Parameters of `python -m steps.mlflow_io.store --name=value`: the configuration keys they override.
OVERRIDES = {
    "experiment": "experiment",
    "keep_versions": "store.keep_versions",
    "keep_backups": "store.keep_backups",
}

if __name__ == "__main__":
    # No store is configured first (cli.main's usual set-up): this step backs it up and upgrades it
    # before anything opens it.
    if sys.argv[1:2] == ["collect"]:
        cli.main(collect, "Copy the database and one run's artifacts.", {}, sys.argv[2:], ("dir", "since_ms", "to"),
                 store=False)  # fmt: skip
    else:
        cli.main(prepare, "Back up, upgrade, create and prune a store kept outside the workspace.", OVERRIDES,
                 own=("dir", "env_file"), store=False)  # fmt: skip
