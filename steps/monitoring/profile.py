"""What the images a model was validated on looked like: the reference its drift check compares batches with.

Three kinds of feature, one value per image:

- image statistics, from the encoded file (``image_statistics``): brightness, contrast, sharpness,
  height, width, aspect and channels;
- the network's own embedding (its pooled features), summarised by the first principal components
  fitted on the validation images and the distance from their span (``embedding_features``);
- the network's defect probability.

``train`` builds the profile from the validation split (never the training images: the network was
fitted on them, so unseen images from the same line would alarm against them) and stores it inside the
logged model as ``PROFILE_ARTIFACT``; a version logged without one has no profile.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from steps.served import serving

STATISTICS = ("brightness", "contrast", "sharpness", "height", "width", "aspect", "channels")
SCORE = "score"
COMPONENTS = 4  # principal components of the embedding kept; with the residual, five features
RESIDUAL = "embedding_residual"
EMBEDDING = (*(f"embedding_pc{i + 1}" for i in range(COMPONENTS)), RESIDUAL)
# Intensity statistics on the image shrunk to this longer side: bounded work for a 64 MP frame, and
# ELPV's 300 px cells are measured as they are.
STATS_SIDE = 512
# The model's artifact key and file name, and the layout's version (a reader refuses another).
PROFILE_ARTIFACT = "reference_profile"
PROFILE_FILE = "profile.json"
PROFILE_VERSION = 1
# Where the embedding is read: the pooled features make_model names "gap".
EMBEDDING_LAYER = "gap"


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """An encoded image as the served model decodes it, and the number of bands its file stores;
    ``serving.ImageError`` when it cannot be decoded."""
    gray = serving.decode_gray(data)
    with Image.open(io.BytesIO(data)) as image:
        return gray, len(image.getbands())


def image_statistics(data: bytes) -> dict[str, float]:
    """The statistics of one encoded image; ``serving.ImageError`` when it cannot be decoded."""
    return statistics_of(*decode(data))


def statistics_of(gray: np.ndarray, channels: int) -> dict[str, float]:
    """``image_statistics`` of a decoded ``(h, w, 1)`` uint8 image with ``channels`` bands in its file.

    Sharpness is the log of the variance of the 4-neighbour Laplacian (blur lowers it, noise raises it).
    """
    height, width = gray.shape[:2]
    image = Image.fromarray(np.asarray(gray[:, :, 0], dtype=np.uint8), mode="L")
    if max(height, width) > STATS_SIDE:
        scale = STATS_SIDE / max(height, width)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    g = np.asarray(image, dtype=np.float32)
    laplacian = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return {
        "brightness": float(g.mean() / 255),
        "contrast": float(g.std() / 255),
        "sharpness": float(np.log10(1 + laplacian.var())) if laplacian.size else 0.0,
        "height": float(height),
        "width": float(width),
        "aspect": float(width / height),
        "channels": float(channels),
    }


def stack(rows: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """Per-image statistics as one array per statistic."""
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in STATISTICS}


@dataclass(frozen=True)
class Embedding:
    """The validation embeddings' mean and their first principal directions, ``(k, d)``."""

    mean: np.ndarray
    components: np.ndarray


def fit_embedding(embeddings: np.ndarray, k: int = COMPONENTS) -> Embedding:
    """Principal components of ``(n, d)`` embeddings (an SVD of the centred matrix)."""
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:k]
    if len(components) < k:  # fewer images or dimensions than components: pad with no direction
        components = np.vstack([components, np.zeros((k - len(components), x.shape[1]))])
    return Embedding(mean, components)


def embedding_features(summary: Embedding, embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Each image's coordinates on the principal directions and its distance from their span: an image
    unlike any seen in validation lands far from it even where its coordinates look ordinary."""
    centred = np.asarray(embeddings, dtype=np.float64) - summary.mean
    coords = centred @ summary.components.T
    residual = np.linalg.norm(centred - coords @ summary.components, axis=1)
    return {**{name: coords[:, i] for i, name in enumerate(EMBEDDING[:-1])}, RESIDUAL: residual}


@dataclass(frozen=True)
class Profile:
    """The reference: each feature's values over the validation images, and the embedding's summary
    (None for a network whose embedding is not read)."""

    reference: Mapping[str, np.ndarray]
    embedding: Embedding | None

    @property
    def n_images(self) -> int:
        return len(next(iter(self.reference.values())))

    def to_json(self) -> str:
        def values(a: np.ndarray) -> list[float]:
            return [float(f"{v:.6g}") for v in np.asarray(a, dtype=np.float64).ravel()]

        body: dict[str, Any] = {
            "profile_version": PROFILE_VERSION,
            "n_images": self.n_images,
            "features": {name: values(v) for name, v in self.reference.items()},
        }
        if self.embedding is not None:
            body["embedding"] = {
                "layer": EMBEDDING_LAYER,
                "mean": values(self.embedding.mean),
                "components": [values(c) for c in self.embedding.components],
            }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """A stored profile; ``ValueError`` saying what is wrong with one this code cannot read."""
        try:
            body = json.loads(text)
            version = body.get("profile_version")
            if version != PROFILE_VERSION:
                raise ValueError(f"profile_version {version!r}, this code reads {PROFILE_VERSION}")
            reference = {name: np.array(v, dtype=np.float64) for name, v in body["features"].items()}
            if not reference or len({len(v) for v in reference.values()}) != 1:
                raise ValueError("its features do not have one value per validation image each")
            embedding = None
            if "embedding" in body:
                e = body["embedding"]
                embedding = Embedding(np.array(e["mean"], np.float64), np.array(e["components"], np.float64))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a reference profile: {type(err).__name__} {err}") from None
        return cls(reference, embedding)


def build_profile(
    statistics: Mapping[str, np.ndarray],
    scores: np.ndarray,
    embeddings: np.ndarray | None = None,
    basis: np.ndarray | None = None,
) -> Profile:
    """The profile of the validation images: their statistics (``stack``), the network's scores and
    (when given) its ``(n, d)`` embeddings, on principal directions fitted to ``basis`` (embeddings of
    other images: directions fitted to the validation images themselves spread them wider along the
    first components than new images will be, with far more dimensions than images), else to them."""
    reference = {**statistics, SCORE: np.asarray(scores, dtype=np.float64).ravel()}
    embedding = None
    if embeddings is not None:
        embedding = fit_embedding(embeddings if basis is None else basis)
        reference |= embedding_features(embedding, embeddings)
    return Profile(reference, embedding)
