"""Progress on long work: a bar on a terminal; in logs, a line every tenth of the total but at least every
256 items (every 1,000 when the total is unknown).

One class for infer's scoring and the training loader's decoding, so both report alike.
"""

from __future__ import annotations

import logging
import math
import sys

logger = logging.getLogger(__name__)


class Progress:
    """Counts ``step()`` calls against ``total`` (None: unknown) and reports as ``verb``."""

    def __init__(self, total: int | None, verb: str = "scored", bar: bool | None = None) -> None:
        self.total, self.done, self.verb = total, 0, verb
        self.bar = None
        if total and (sys.stdout.isatty() if bar is None else bar):
            from keras.utils import Progbar

            self.bar = Progbar(total, unit_name="image")
        self.every = max(256, math.ceil(total / 10)) if total else 1000

    def __enter__(self) -> Progress:
        return self

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            if self.done % 64 == 0 or self.done == self.total:
                self.bar.update(self.done)
        elif self.done % self.every == 0:
            logger.info("%s %d%s images", self.verb, self.done, f" of {self.total}" if self.total else "")

    def __exit__(self, *exc: object) -> None:
        if self.bar is None and self.done % self.every:
            logger.info("%s %d images", self.verb, self.done)
