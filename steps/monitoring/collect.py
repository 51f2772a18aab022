"""A batch's features, gathered a chunk at a time while it is scored: each usable image's statistics, the
model's probability and (where the Keras network is at hand) its embedding's coordinates on the profile's
principal directions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from steps.monitoring.profile import SCORE, Embedding, decode, embedding_features, stack, statistics_of
from steps.served import serving

Embedder = Callable[[np.ndarray], np.ndarray]  # (n, size, size, 1) pixels -> (n, d) embeddings


class BatchFeatures:
    """Accumulates ``add``-ed chunks; ``features()`` is what ``steps.monitoring.drift.check`` compares.

    ``embed`` and ``embedding`` (the profile's) together give the embedding's features; without them
    (an export scores, or the profile has none) the batch has statistics and scores only.
    """

    def __init__(self, image_size: int, embed: Embedder | None = None, embedding: Embedding | None = None) -> None:
        self.image_size = image_size
        self.embed = embed if embedding is not None else None
        self.embedding = embedding
        self.rows: list[dict[str, float]] = []
        self.scores: list[float] = []
        self.embeddings: list[np.ndarray] = []

    @property
    def parts(self) -> list[str]:
        """What the check compares: statistics and scores always, the embedding when it can be read."""
        return ["statistics", "scores", *(["embedding"] if self.embed else [])]

    def add(self, sources: Sequence[bytes | None], probabilities: Sequence[float | None]) -> None:
        """One chunk: the encoded images and their probabilities (None where an image was not scored)."""
        resized = []
        for source, prob in zip(sources, probabilities, strict=True):
            if source is None or prob is None or not np.isfinite(prob):
                continue
            try:
                gray, channels = decode(source)
            except (serving.ImageError, OSError):  # scored moments ago; changed since: left out
                continue
            self.rows.append(statistics_of(gray, channels))
            self.scores.append(float(prob))
            if self.embed:
                resized.append(serving.resize(gray, self.image_size))
        if self.embed and resized:
            self.embeddings.append(np.asarray(self.embed(np.stack(resized))))

    def features(self) -> dict[str, np.ndarray]:
        if not self.rows:
            return {}
        out = {**stack(self.rows), SCORE: np.array(self.scores)}
        if self.embed and self.embedding is not None and self.embeddings:
            out |= embedding_features(self.embedding, np.concatenate(self.embeddings))
        return out
