"""The local engine of ``infer``: which files an input names, reading them without leaving it, loading the
version it scores with (pinned, so a moving alias cannot change it mid-run), scoring a chunk at a time,
Grad-CAM of the most confident defects, and the review queue of the least certain images."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from steps.core import contract
from steps.core.errors import ModelError, OutputError, PipelineError, first_line
from steps.datasets.data import is_image
from steps.inference.outputs import error_row, row
from steps.mlflow_io.loading import load_keras, model_artifact, pipeline_model_problem
from steps.mlflow_io.registry import alias_version
from steps.monitoring import review
from steps.network import plots
from steps.served import packaging, serving
from steps.served.serving import DefectModel, ImageError

logger = logging.getLogger(__name__)


# Files read and scored per step: enough to keep both cores busy decoding, little memory. A step
# also ends once its files' bytes reach CHUNK_BYTES, so a folder of large frames stays bounded too.
CHUNK = 256


CHUNK_BYTES = 64 * 1024 * 1024


def resolve_inputs(spec: str) -> tuple[list[Path], Path]:
    """An image file, a directory (recursive) or a glob: ``(sorted image files, the input's root)``.

    Nothing is read from outside the root (``outside_input``): the directory itself, a glob's
    directory part before its first wildcard, or a single file's folder.
    """
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if is_image(p))
        root = path
    else:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if is_image(Path(p)))
        root = glob_root(spec)
    if not files:
        raise PipelineError(
            f"parameter input: no images found at {spec!r}; expected an image file, a directory or a glob"
        )
    return files, root


def glob_root(pattern: str) -> Path:
    """The directory a glob searches: its parts before the first one with a wildcard."""
    parts = Path(pattern).parts
    fixed = [part for part in itertools.takewhile(lambda part: not re.search(r"[*?[]", part), parts)]
    return Path(*fixed) if fixed else Path(".")


def check_output(output: Path) -> None:
    """Refuse, before any work, an output that is a directory or cannot be written."""
    if output.is_dir():
        raise PipelineError(
            f"parameter output: {output} is a directory; expected a file path, e.g. {output}/predictions.csv"
        )
    existing = next(p for p in [output.parent.absolute(), *output.parent.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PipelineError(f"parameter output: cannot create {output}: {existing} is not a writable directory")


def outside_input(path: Path, root: Path) -> str | None:
    """Why a file found under the input's root is not read: a link (to it, or to a folder on its
    way) that leads out of the root.

    The input decides what is scored, not where infer reads from: a symlink pointing elsewhere on
    the machine is reported, never followed, whichever form the input took.
    """
    if path.resolve().is_relative_to(root.resolve()):
        return None
    return f"a symlink to {path.resolve()}, outside the input {root}: not read"


def read_inside(path: Path, root: Path, max_bytes: int) -> bytes:
    """The file's bytes, checked against the root and its size against ``max_bytes`` (from its
    size on disk, before a byte is read) at the moment it is read; ``ImageError`` says why not."""
    reason = outside_input(path, root)
    if reason is not None:
        raise ImageError(reason)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise ImageError(f"{size:,} bytes, more than the limit of {max_bytes:,} (-P max_file_mb); not read")
            return handle.read(max_bytes + 1)
    except OSError as err:
        raise ImageError(f"cannot read the file: {err.strerror or err}") from None


def pinned_uri(model_uri: str) -> tuple[str, str | None]:
    """``models:/name@alias`` as ``models:/name/<version>`` (what we score with, even if the alias
    moves meanwhile) and that version; other URIs unchanged, with their version if they name one."""
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        version = alias_version(name, alias)
        if version is None:
            raise PipelineError(
                f"no model at {model_uri}: no version of {name!r} has the alias {alias!r} yet; run "
                "`mlflow run . -e main` (or evaluate a run that passes the threshold) first"
            )
        return f"models:/{name}/{version}", version
    if model_uri.startswith("models:/"):
        return model_uri, model_uri.rsplit("/", 1)[1]
    return model_uri, None


def load_production_model(
    model_uri: str, batch_size: int, runtime: str = "keras"
) -> tuple[DefectModel, str, str | None]:
    """The served model's code around the version's network, or its export in ``runtime``:
    ``(model, pinned URI, version)``."""
    uri, version = pinned_uri(model_uri)
    try:
        info = mlflow.models.get_model_info(uri)
        problem = pipeline_model_problem(info)
        if problem is not None:
            raise ModelError(f"cannot load {model_uri}: it is not a model train logged ({problem})")
        if runtime == "keras":
            network: Any = load_keras(uri)
        else:
            missing = (
                f"has no {runtime} export (trained with -P exports without it, or before train exported); "
                "use -P runtime=keras, or train and register it again"
            )
            path = model_artifact(uri, serving.EXPORT_ARTIFACTS[runtime], missing, info.flavors)
            network = serving.load_export(runtime, path)
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"cannot load {model_uri}: {first_line(err)}") from None
    # No per-call pixel cap (a REST safeguard, 0): infer bounds memory by chunk and decodes one image at a time.
    config = packaging.model_config(info.metadata or {}, batch_size, max_request_pixels=0, runtime=runtime)
    return DefectModel(network, config), uri, version


def chunks(
    files: list[Path], root: Path, max_bytes: int
) -> Iterator[tuple[list[Path], list[bytes | None], dict[int, str]]]:
    """``(paths, their bytes, {index: why not read})`` of at most ``CHUNK`` files or ``CHUNK_BYTES`` bytes."""
    paths: list[Path] = []
    sources: list[bytes | None] = []
    refused: dict[int, str] = {}
    size = 0
    for path in files:
        try:
            data = read_inside(path, root, max_bytes)
        except ImageError as err:
            refused[len(paths)] = str(err)
            data = None
        paths.append(path)
        sources.append(data)
        size += len(data or b"")
        if len(paths) == CHUNK or size >= CHUNK_BYTES:
            yield paths, sources, refused
            paths, sources, refused, size = [], [], {}, 0
    if paths:
        yield paths, sources, refused


def score_local(
    model: DefectModel,
    files: list[Path],
    root: Path,
    max_bytes: int,
    observe: Callable[[list[bytes | None], list[float | None]], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows in file order, a chunk at a time; an unreadable file gets its reason, not a crash.
    ``observe`` sees each chunk's bytes and probabilities (None where not scored): the drift check's."""
    for paths, sources, refused in chunks(files, root, max_bytes):
        scored = model.predict(None, pd.DataFrame({"image": sources}), params={"on_error": "row"})
        if observe is not None:
            probs = scored[serving.DEFECT_PROBABILITY].tolist()
            observe(sources, [None if scored[serving.ERROR].iat[i] else p for i, p in enumerate(probs)])
        for i, (path, scored_row) in enumerate(zip(paths, scored.to_dict("records"), strict=True)):
            yield error_row(path, refused[i]) if i in refused else row(path, scored_row)


def log_gradcam(
    model: DefectModel, defects: list[tuple[float, str]], top: int, root: Path | None, uri: str, max_bytes: int
) -> None:
    """Grad-CAM of the ``top`` most confident defects, one PNG grid (``gradcam.png``)."""
    chosen = sorted(defects, key=lambda d: -d[0])[:top]
    fig = gradcam_figure(
        model, chosen, root, uri, max_bytes, f"where the model sees a defect (Grad-CAM), top {len(chosen)}"
    )
    if fig is not None:
        mlflow.log_figure(fig, contract.GRADCAM_ARTIFACT)
        plots.close(fig)


def log_review(
    model: DefectModel,
    rows: list[dict[str, Any]],
    root: Path | None,
    uri: str,
    max_bytes: int,
    review_dir: str | None,
    run_id: str,
) -> int:
    """The review queue of ``rows`` (``steps.monitoring.review``), with their Grad-CAM: the infer run's
    artifact ``review/``, and with ``review_dir`` a copy in ``<review_dir>/<run_id>/``. Returns its size."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / contract.REVIEW_ARTIFACT
        n = review.write_queue(rows, folder, lambda path: read_again(path, root, max_bytes))
        if not n:
            return 0
        chosen = [(r[serving.DEFECT_PROBABILITY], r[serving.PATH]) for r in rows]
        fig = gradcam_figure(model, chosen, root, uri, max_bytes, f"nearest the cut-off, to review ({len(chosen)})")
        if fig is not None:
            fig.savefig(folder / review.GRADCAM_FILE, dpi=100)
            plots.close(fig)
        mlflow.log_artifacts(str(folder), contract.REVIEW_ARTIFACT)
        where = f"the run's artifacts ({contract.REVIEW_ARTIFACT}/)"
        if review_dir:
            target = Path(review_dir) / run_id
            try:
                shutil.copytree(folder, target)
            except OSError as err:
                raise OutputError(f"cannot write the review queue to {target}: {err.strerror or err}") from None
            where += f" and {target}"
    logger.info("review queue: the %d images nearest the cut-off, to label, in %s", n, where)
    return n


def gradcam_figure(
    model: DefectModel, chosen: list[tuple[float, str]], root: Path | None, uri: str, max_bytes: int, title: str
) -> Any:
    """A grid of the ``chosen`` ``(probability, path)`` images with their Grad-CAM heat maps; None if none is left.

    The files are read again, and checked against the input's ``root`` again as they are: one
    replaced by a link since scoring is not followed (its heat map is left out). Gradients need
    the Keras network: an export's scores are explained with the network it was made from (``uri``).
    """
    from steps.network.explain import gradcam

    if not chosen:
        return None
    sources = [read_again(path, root, max_bytes) for _, path in chosen]
    images, errors = model.preprocess(sources)
    keep = [i for i in range(len(chosen)) if i not in errors]  # a file changed or gone since scoring
    if not keep:
        return None
    network = model.network if model.runtime == "keras" else load_keras(uri)
    heat = gradcam(network, images[keep])
    return plots.gradcam_grid(
        images[keep], heat, [chosen[i][0] for i in keep], [chosen[i][1] for i in keep], model.threshold, title
    )


def read_again(path: str, root: Path | None, max_bytes: int) -> bytes | None:
    """A scored file's bytes again, local (inside ``root``) or (from Spark) any URI Spark read it from."""
    try:
        if root is None:
            from pyspark.sql import SparkSession

            spark = SparkSession.getActiveSession()
            row = spark.read.format("binaryFile").load(path).first() if spark else None
            return bytes(row["content"]) if row else None
        return read_inside(Path(path), root, max_bytes)
    except Exception:  # noqa: BLE001 - a heat map is a bonus; a file gone since scoring must not fail infer
        return None
