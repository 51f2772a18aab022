"""The review queue: the images a model was least sure of, for a person to label.

``infer`` keeps the ``review_top`` scored images nearest their cut-off (``steps.inference.outputs.Writer``)
and writes them here as a folder: ``images/`` (each file's bytes as scored, under a numbered name), a
Grad-CAM grid, and ``review.csv`` with one row per image and an empty ``label`` column. Filled in with
the class names, the CSV goes to the ``label`` entry point (``steps.datasets.intake``), which adds the
images to the training data.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from steps.served import serving

QUEUE_CSV = "review.csv"
IMAGES_DIR = "images"
GRADCAM_FILE = "gradcam.png"
# The CSV's columns: the copy (relative to the CSV), where it came from, what the model said, and the
# column the reviewer fills in with a class name (an empty one: not reviewed, left out).
FILE, SOURCE, LABEL = "file", "source", "label"
COLUMNS = (FILE, SOURCE, serving.DEFECT_PROBABILITY, serving.DECISION_THRESHOLD, serving.PREDICTED_CLASS, LABEL)


def queue_name(index: int, source: str) -> str:
    """The copy's name: its rank, then the source's own name (made safe for any file system)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.replace("\\", "/")).name).lstrip(".") or "image"
    return f"{index:03d}_{stem}"


def write_queue(rows: Sequence[dict[str, Any]], folder: Path, read: Callable[[str], bytes | None]) -> int:
    """Write the queue of ``rows`` (infer's output rows, nearest first) into ``folder``; the images'
    bytes come from ``read`` (None: gone since scoring, left out). Returns the number of images written."""
    (folder / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    written = 0
    with (folder / QUEUE_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            data = read(row[serving.PATH])
            if data is None:
                continue
            name = f"{IMAGES_DIR}/{queue_name(written, row[serving.PATH])}"
            (folder / name).write_bytes(data)
            writer.writerow(
                {
                    FILE: name,
                    SOURCE: row[serving.PATH],
                    serving.DEFECT_PROBABILITY: f"{row[serving.DEFECT_PROBABILITY]:.6f}",
                    serving.DECISION_THRESHOLD: f"{row[serving.DECISION_THRESHOLD]:.6f}",
                    serving.PREDICTED_CLASS: row[serving.PREDICTED_CLASS],
                    LABEL: "",
                }
            )
            written += 1
    return written
