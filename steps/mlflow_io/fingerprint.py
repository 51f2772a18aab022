"""What determines a stage's result, as one digest: ``main`` reuses a finished run that has the same.

A stage's fingerprint covers its entry point; the parameters ``main`` passes it, which carry the
resolved configuration and the upstream run it consumes (evaluate's ``run_id``; infer's model
version); the project's code (``CODE``: ``steps/``, ``conf/``, ``MLproject`` and the requirements,
by content, so an uncommitted change counts and no git is needed); and the content of the data it
reads. Anything else (the README, the tests) does not change it. Pure functions over files: no MLflow.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from steps.core.config import PROJECT_DIR

# What runs, relative to the project: a change to any file under these reruns every stage.
CODE = ("steps", "conf", "MLproject", "requirements.txt", "python_env.yaml")


def _files(root: Path, names: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for name in names:
        path = root / name
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(found)


def tree_digest(root: Path, names: Iterable[str] = (".",)) -> str:
    """A digest of the files under ``root/<name>`` for each name: their paths relative to ``root`` and
    their bytes (not their times), in path order."""
    total = hashlib.sha256()
    for path in _files(root, names):
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        total.update(f"{path.relative_to(root).as_posix()}\0{content}\n".encode())
    return total.hexdigest()


def code_digest(root: Path = PROJECT_DIR) -> str:
    return tree_digest(root, CODE)


# Parameters that name where the data is, whose content ``data`` stands for: the same images in
# another folder give the same result.
LOCATIONS = ("data_dir",)


def fingerprint(entry_point: str, parameters: Mapping[str, str], code: str, data: str) -> str:
    """The stage's fingerprint: equal exactly when the entry point, its parameters (but the data's
    location), the code and the data it reads are."""
    kept = {k: v for k, v in parameters.items() if k not in LOCATIONS}
    payload = json.dumps({"entry_point": entry_point, "parameters": kept, "code": code, "data": data}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
