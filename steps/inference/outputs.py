"""infer's output: one row per input image, written to CSV or JSON Lines as the rows come, renamed
into place only when complete."""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steps.core.errors import OutputError
from steps.core.progress import Progress
from steps.served import serving

COLUMNS = (serving.PATH, *serving.COLUMNS)


def error_row(path: Any, reason: str) -> dict[str, Any]:
    return {serving.PATH: str(path), serving.PREDICTED_CLASS: "", serving.DEFECT_PROBABILITY: None,
            serving.DECISION_THRESHOLD: None, serving.ERROR: reason}  # fmt: skip


def row(path: Any, scored: Any) -> dict[str, Any]:
    """An output row from one row of the model's output (a pandas or a Spark row: read by key)."""
    if scored["error"]:
        return error_row(path, scored["error"])
    return {serving.PATH: str(path), serving.PREDICTED_CLASS: scored[serving.PREDICTED_CLASS],
            serving.DEFECT_PROBABILITY: float(scored[serving.DEFECT_PROBABILITY]),
            serving.DECISION_THRESHOLD: float(scored[serving.DECISION_THRESHOLD]), serving.ERROR: ""}  # fmt: skip


class Writer:
    """Rows to a CSV or JSON Lines file (by suffix) as they come; counts them on the way.

    The rows go to a hidden file beside ``path``, renamed over it once all are written: a reader
    never sees half a file, a failed or killed run leaves the previous one untouched, and of two
    runs writing one path the last to finish wins whole.
    """

    def __init__(self, path: Path, defect_class: str, review_top: int = 0) -> None:
        self.path, self.defect_class, self.review_top = path, defect_class, review_top
        self.sha256 = ""  # of the file written
        self.n_images = self.n_scored = self.n_defect = self.n_errors = 0
        self.defects: list[tuple[float, str]] = []  # (probability, path) of every predicted defect
        # The review_top scored rows nearest their cut-off, as a heap whose root is the farthest kept.
        self._nearest: list[tuple[float, int, dict[str, Any]]] = []

    def write(self, rows: Iterable[dict[str, Any]], total: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        jsonl = self.path.suffix.lower() == ".jsonl"
        # Same folder, so the rename is atomic; the PID keeps two runs' partial files apart.
        part = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
        try:
            with part.open("w", newline="") as handle, Progress(total) as progress:
                writer = None if jsonl else csv.DictWriter(handle, fieldnames=COLUMNS)
                if writer:
                    writer.writeheader()
                for row in rows:
                    self.count(row)
                    if writer:
                        writer.writerow({**row, **_csv_numbers(row)})
                    else:
                        handle.write(json.dumps(row) + "\n")
                    progress.step()
                handle.flush()
                os.fsync(handle.fileno())
            self.sha256 = hashlib.sha256(part.read_bytes()).hexdigest()
            os.replace(part, self.path)
        except OSError as err:  # a full or read-only disk: one line, and the previous file as it was
            raise OutputError(
                f"cannot write {self.path}: {err.strerror or err}; "
                + ("the previous file is unchanged" if self.path.exists() else "nothing was written")
            ) from None
        finally:
            part.unlink(missing_ok=True)

    def count(self, row: dict[str, Any]) -> None:
        self.n_images += 1
        if row["error"]:
            self.n_errors += 1
            return
        self.n_scored += 1
        if self.review_top:
            distance = abs(row[serving.DEFECT_PROBABILITY] - row[serving.DECISION_THRESHOLD])
            entry = (-distance, -self.n_images, row)  # ties: the earlier row is kept
            if len(self._nearest) < self.review_top:
                heapq.heappush(self._nearest, entry)
            elif entry > self._nearest[0]:
                heapq.heapreplace(self._nearest, entry)
        if row[serving.PREDICTED_CLASS] == self.defect_class:
            self.n_defect += 1
            self.defects.append((row[serving.DEFECT_PROBABILITY], row[serving.PATH]))

    @property
    def nearest(self) -> list[dict[str, Any]]:
        """The ``review_top`` scored rows nearest their cut-off, nearest first (ties in input order)."""
        return [row for _, _, row in sorted(self._nearest, key=lambda e: (-e[0], -e[1]))]


def _csv_numbers(row: dict[str, Any]) -> dict[str, str]:
    numbers = (serving.DEFECT_PROBABILITY, serving.DECISION_THRESHOLD)
    return {k: "" if row[k] is None else f"{row[k]:.6f}" for k in numbers}
