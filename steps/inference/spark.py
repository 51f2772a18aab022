"""infer's Spark engine: ``mlflow.pyfunc.spark_udf`` over Spark's ``binaryFile`` source, and the Java
check that comes before it (Spark runs on the JVM and needs Java 17 or newer)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from steps.core.errors import PipelineError
from steps.datasets.data import IMAGE_SUFFIXES
from steps.inference.outputs import error_row, row
from steps.served import packaging

JAVA_INSTALL = "Debian/Ubuntu: apt-get install openjdk-17-jre-headless; macOS: brew install openjdk@17"


def java_problem() -> str | None:
    """Why Spark cannot start here (it runs on the JVM and needs Java 17 or newer), or None.

    Looks where pyspark does: ``$JAVA_HOME/bin/java``, else ``java`` on ``PATH``.
    """
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).is_file():
        return "Java was not found (" + (f"JAVA_HOME={home} has no bin/java" if home else "no java on PATH") + ")"
    try:
        text = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{java} -version failed ({err})"
    found = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    major = int(found.group(2) if found and found.group(1) == "1" else found.group(1)) if found else 0
    return None if major >= 17 else f"{java} is Java {major or 'of an unknown version'}"


def check_spark() -> None:
    """One line, before any work, when ``engine=spark`` cannot run here."""
    problem = java_problem()
    if problem:
        raise PipelineError(
            f"parameter engine: spark needs Java 17 or newer, and {problem}; install it ({JAVA_INSTALL})"
        )


def score_spark(
    model_uri: str, files: list[Path] | None, spec: str, master: str, chunk: int, model_config: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Rows from ``mlflow.pyfunc.spark_udf`` over Spark's ``binaryFile`` source (by path for ``files=None``).

    ``files``: the local files to read (the local engine's list); None for a path only Spark can
    list (``hdfs://``, ``s3a://``...), read recursively and filtered by image suffix. Rows stream
    to this process one partition at a time, so the output need not fit in memory.
    """
    try:
        from pyspark.sql import SparkSession
        from pyspark.sql import functions as F
    except ImportError:
        raise PipelineError(
            "parameter engine: spark needs pyspark and Java 17 or newer: pip install pyspark "
            "(requirements-dev.txt has it; .ci/run installs Java)"
        ) from None
    # Spark's Python workers must be this interpreter, which has the model's packages; they inherit
    # this environment, so TensorFlow's start-up chatter stays out of the logs there too (steps/__init__.py).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    try:
        spark = (
            SparkSession.builder.master(master)
            .appName("defect-detection infer")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())  # a bar on a terminal only
            .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(chunk))
            .getOrCreate()
        )
    except Exception as err:  # noqa: BLE001 - pyspark raises its own runtime error types
        if "JAVA_GATEWAY_EXITED" not in str(err):
            raise
        raise PipelineError(f"parameter engine: Spark's JVM did not start ({JAVA_INSTALL}; Java 17+)") from None
    udf = mlflow.pyfunc.spark_udf(
        spark,
        model_uri,
        result_type=packaging.spark_result_type(),
        env_manager="local",
        params={"on_error": "row"},
        model_config=model_config,  # infer's: an Arrow batch is not a REST request
    )
    reader = spark.read.format("binaryFile")
    if files is None:
        suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        frame = reader.option("recursiveFileLookup", "true").load(spec)
        frame = frame.where(F.lower(F.col("path")).rlike(rf"\.({suffixes})$"))
    else:
        frame = reader.load([str(p.absolute()) for p in files])
    scored = frame.select("path", udf(F.col("content")).alias("p"))
    if files is None:  # local files are put in the local engine's order by the caller, with no shuffle
        scored = scored.orderBy("path")
    # Spark names a local file "file:" + its path, not escaped (Hadoop's Path: "file:/a b/#1.png");
    # rows name it as the local engine does.
    local = {str(p.absolute()): str(p) for p in files or []}
    for record in scored.toLocalIterator():
        path = record["path"]
        if path.startswith("file:"):
            path = local.get("/" + path.removeprefix("file:").lstrip("/"), path)
        yield row(path, record["p"])


def spark_rows(
    model_uri: str,
    files: list[Path],
    refused: dict[Path, str],
    spec: str,
    master: str,
    chunk: int,
    model_config: dict[str, Any],
) -> Iterator[dict[str, Any]]:
    """Spark's rows for local files, in the local engine's order; ``refused`` files (links out of the
    input) get their reason and are not read."""
    read = [p for p in files if p not in refused]
    by_path = {row["path"]: row for row in score_spark(model_uri, read, spec, master, chunk, model_config)}
    for path in files:
        if path in refused:
            yield error_row(path, refused[path])
        else:  # Spark fails the job on a file it cannot read; should a row be missing, it says so
            yield by_path.get(str(path)) or error_row(path, "Spark returned no row for this file")
