"""Whether a logged model is one this project's ``train`` wrote, recomputed from its files.

Whoever can log a run in a ``train/`` experiment writes the whole model directory: its ``MLmodel``,
its code, its environment. ``mlflow models serve`` and Spark load what is there, so the check at
registration and promotion is the guard. ``check_files`` (pure) refuses, in one line:

- a code file whose SHA-256 is not in ``RELEASES`` (``steps/served/serving_releases.txt``: one line per
  released ``steps/served/serving.py``), bytecode beside it that is not that code, or a model whose code
  is not that one file;
- a ``code:`` folder (MLflow puts it first on ``sys.path`` at load: it could shadow Pillow);
- a model config with other keys or values than ``train`` writes (``read_paths`` true, another
  runtime or pixel cap);
- an environment (``requirements.txt``, ``python_env.yaml``, ``conda.yaml``) other than the pinned
  packages ``steps.served.packaging`` writes, or any file ``train`` does not write.

``verify`` reads those files from the store and returns the code's digest, which evaluate records on
the version (``code_sha256``). ``check_version`` recomputes it for a version that should take
``prod`` and refuses a tag that is missing or differs from the files (a forged verification).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import yaml

from steps.core import contract
from steps.core.errors import ModelError
from steps.served import packaging, serving
from steps.served.packaging import APPLE_SILICON, PACKAGES

logger = logging.getLogger(__name__)

RELEASES = Path(__file__).with_name("serving_releases.txt")
CODE_FILE = Path(serving.__file__).name
# What train's model directory holds at its top, besides the artifacts folder.
TOP_FILES = {
    "MLmodel",
    CODE_FILE,
    "requirements.txt",
    "python_env.yaml",
    "conda.yaml",
    "input_example.json",
    "serving_input_example.json",
    "registered_model_meta",  # written by MLflow when a version is registered
}
ENV_FILES = ("requirements.txt", "python_env.yaml", "conda.yaml")
PYCACHE = "__pycache__"
ARTIFACTS_DIR = "artifacts"
_VERSION = r"[0-9][0-9A-Za-z.+!-]*"
_PIN = re.compile(rf"(?P<name>[a-z0-9-]+)==(?P<version>{_VERSION})(?P<marker>;.*)?")
_BUILD = re.compile(rf"(pip|setuptools|wheel)(==|<=)?({_VERSION})?")
_PYTHON = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)?")


def released_digests(path: Path = RELEASES) -> set[str]:
    """The SHA-256 of every released ``steps/served/serving.py``: the first word of each line, ``#`` comments aside."""
    lines = (line.split("#", 1)[0].split() for line in path.read_text().splitlines())
    return {words[0] for words in lines if words}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flavor_problem(flavors: Mapping[str, Any]) -> str | None:
    """Why a model's flavors are not the served model ``train`` logs (python_function, from code)."""
    pyfunc = flavors.get("python_function") or {}
    if set(flavors) != {"python_function"} or pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model":
        return f"its flavors are {sorted(flavors)}, not the served model train logs (python_function, from code)"
    return None


def check_files(mlmodel: Mapping[str, Any], files: Mapping[str, bytes], releases: set[str]) -> str:
    """The digest of a model's code, or ``ModelError`` saying what in its files ``train`` never wrote.

    ``mlmodel``: the parsed ``MLmodel``; ``files``: the names at the model's top (``artifacts/`` as
    ``artifacts``), with the bytes of its code and environment files.
    """
    extra = sorted(name for name in set(files) - TOP_FILES - {ARTIFACTS_DIR, PYCACHE} if "/" not in name)
    if extra:
        raise ModelError(f"holds files train never writes: {', '.join(extra)}")
    flavors = mlmodel.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    wrong = flavor_problem(flavors)
    if wrong:
        raise ModelError(wrong)
    if pyfunc.get("code"):
        raise ModelError(f"its MLmodel names a code folder ({pyfunc['code']!r}), which MLflow puts first on sys.path")
    if PurePosixPath(str(pyfunc.get("model_code_path", ""))).name != CODE_FILE or CODE_FILE not in files:
        raise ModelError(f"its code is not the one file {CODE_FILE} train logs")
    digest = sha256(files[CODE_FILE])
    if digest not in releases:
        raise ModelError(
            f"its code {CODE_FILE} (sha256 {digest[:12]}...) is no released version of steps/served/serving.py "
            f"(steps/{RELEASES.name})"
        )
    _check_bytecode({k.split("/", 1)[1]: v for k, v in files.items() if k.startswith(PYCACHE + "/")}, files[CODE_FILE])
    _check_config(pyfunc.get("config"), mlmodel.get("metadata") or {})
    if pyfunc.get("env") != {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}:
        raise ModelError(f"its MLmodel names environment files train never writes: {pyfunc.get('env')!r}")
    missing = [name for name in ENV_FILES if name not in files]
    if missing:
        raise ModelError(f"it has no {', '.join(missing)}")
    pins = _check_requirements(files["requirements.txt"].decode("utf-8", "replace").splitlines())
    _check_python_env(_yaml(files["python_env.yaml"], "python_env.yaml"))
    _check_conda(_yaml(files["conda.yaml"], "conda.yaml"), pins)
    return digest


def _check_bytecode(pycs: Mapping[str, bytes], source: bytes) -> None:
    """Python writes ``__pycache__`` beside the code when a model is loaded in place (a local store),
    and may later run that bytecode instead of the source: each file must be this code, compiled."""
    stem = PurePosixPath(CODE_FILE).stem
    for name, data in pycs.items():
        found = re.fullmatch(rf"{stem}\.(?P<tag>[\w-]+?)(?:\.opt-(?P<opt>[12]))?\.pyc", name)
        if not found or found["tag"] != sys.implementation.cache_tag or data[:4] != importlib.util.MAGIC_NUMBER:
            raise ModelError(f"its {PYCACHE} holds {name}, which this Python cannot check against its code")
        try:
            code = marshal.loads(data[16:])
            same = code == compile(source, code.co_filename, "exec", dont_inherit=True, optimize=int(found["opt"] or 0))
        except (ValueError, EOFError, TypeError, AttributeError, SyntaxError):
            same = False
        if not same:
            raise ModelError(
                f"its {PYCACHE}/{name} is not the bytecode of its {CODE_FILE}, and Python may run it instead"
            )


def _check_config(config: Any, metadata: Mapping[str, Any]) -> None:
    """The model config train writes (``packaging.model_config``): no file reading, the default cap
    and runtime, the metadata's classes, size and cut-off, a sane batch size."""
    if not isinstance(config, dict):
        raise ModelError(f"its model config is {type(config).__name__}, not the mapping train writes")
    batch = config.get("predict_batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 4096:
        raise ModelError(f"its model config predict_batch_size is {batch!r}, not a batch size train writes")
    try:
        expected = packaging.model_config(metadata, predict_batch_size=batch)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(
            f"its metadata cannot give the model config train writes ({type(err).__name__}: {err})"
        ) from None
    # Versions logged by earlier releases lack the keys added since; a key they have must hold train's value.
    differ = sorted(k for k in set(config) | set(expected) if k in config and config[k] != expected.get(k, object()))
    if differ:
        shown = ", ".join(f"{k}={config[k]!r}" for k in differ)
        raise ModelError(f"its model config differs from what train writes: {shown}")


def _check_requirements(lines: list[str]) -> list[str]:
    pins = [line.strip() for line in lines if line.strip()]
    names = []
    for line in pins:
        found = _PIN.fullmatch(line)
        name = found["name"] if found else ""
        marker = (found["marker"] or "") if found else ""
        if (
            not found
            or name not in PACKAGES
            or marker not in ("", APPLE_SILICON)
            or (marker and name != "tensorflow-metal")
        ):
            raise ModelError(f"its requirements.txt has {line[:80]!r}: train writes only pinned {', '.join(PACKAGES)}")
        names.append(name)
    if len(set(names)) != len(names) or not {"mlflow", "keras", "tensorflow", "pillow"} <= set(names):
        raise ModelError(f"its requirements.txt pins {', '.join(names)}: not the set train writes")
    return pins


def _check_python_env(env: Any) -> None:
    ok = (
        isinstance(env, dict)
        and set(env) == {"python", "build_dependencies", "dependencies"}
        and _PYTHON.fullmatch(str(env["python"])) is not None
        and isinstance(env["build_dependencies"], list)
        and all(_BUILD.fullmatch(str(d)) for d in env["build_dependencies"])
        and env["dependencies"] == ["-r requirements.txt"]
    )
    if not ok:
        raise ModelError("its python_env.yaml installs more than requirements.txt (train writes no other package)")


def _check_conda(env: Any, pins: list[str]) -> None:
    deps = env.get("dependencies") if isinstance(env, dict) else None
    ok = (
        isinstance(env, dict)
        and set(env) <= {"channels", "dependencies", "name"}
        and env.get("channels") == ["conda-forge"]
        and isinstance(deps, list)
        and len(deps) == 3
        and re.fullmatch(r"python=[0-9.]+", str(deps[0])) is not None
        and _BUILD.fullmatch(str(deps[1])) is not None
        and deps[2] == {"pip": pins}
    )
    if not ok:
        raise ModelError("its conda.yaml installs other packages than requirements.txt pins")


def _yaml(data: bytes, name: str) -> Any:
    try:
        return yaml.safe_load(data)
    except yaml.YAMLError as err:
        raise ModelError(f"its {name} is not YAML ({str(err).splitlines()[0]})") from None


def read_model_files(model_uri: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A logged model's ``MLmodel`` and its top-level files (code and environment read, the rest named)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(model_uri)  # models:/name/version, models:/m-<id> and runs:/ alike
    files: dict[str, bytes] = {PurePosixPath(f.path).name: b"" for f in repo.list_artifacts("")}
    if PYCACHE in files:
        files |= {f"{PYCACHE}/{PurePosixPath(f.path).name}": b"" for f in repo.list_artifacts(PYCACHE)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in files if n in ("MLmodel", CODE_FILE, *ENV_FILES) or n.startswith(PYCACHE + "/")]:
            files[name] = Path(repo.download_artifacts(name, tmp)).read_bytes()
    if "MLmodel" not in files:
        raise ModelError("it has no MLmodel file")
    mlmodel = _yaml(files["MLmodel"], "MLmodel")
    if not isinstance(mlmodel, dict):
        raise ModelError("its MLmodel is not a mapping")
    return mlmodel, files


def verify(model_uri: str) -> str:
    """The digest of the model's code, recomputed from its files in the store; ``ModelError`` if refused."""
    mlmodel, files = read_model_files(model_uri)
    return check_files(mlmodel, files, released_digests())


def check_version(client: mlflow.MlflowClient, name: str, version: str) -> str:
    """Recompute a registered version's verification and compare it with its ``code_sha256`` tag."""
    tags = client.get_model_version(name, version).tags
    uri = f"models:/{name}/{version}"
    try:
        digest = verify(uri)
    except ModelError as err:
        raise ModelError(f"{name} version {version} is refused: {err}") from None
    recorded = tags.get(contract.VERSION_TAG_CODE_SHA256)
    if recorded is None:
        raise ModelError(
            f"{name} version {version} has no {contract.VERSION_TAG_CODE_SHA256} tag (registered before its code "
            "was verified): run `python -m steps.promote verify` (make verify-registry) to verify and tag it"
        )
    if recorded != digest:
        raise ModelError(
            f"{name} version {version}'s {contract.VERSION_TAG_CODE_SHA256} tag ({recorded[:12]}...) does not "
            f"match its code ({digest[:12]}...): the tag was not written by evaluate"
        )
    return digest
