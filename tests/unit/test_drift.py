"""The drift check's pieces: image statistics, the reference profile, the per-batch tests and their correction."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from steps.monitoring import drift
from steps.monitoring.collect import BatchFeatures
from steps.monitoring.profile import (
    EMBEDDING,
    RESIDUAL,
    SCORE,
    STATISTICS,
    Profile,
    build_profile,
    embedding_features,
    fit_embedding,
    image_statistics,
)

pytestmark = pytest.mark.unit


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def cell(seed: int, size: int = 64) -> np.ndarray:
    """A textured gray image: stripes plus noise, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    x = np.arange(size)
    stripes = 100 + 60 * np.sin(x / 3.0)[None, :] * np.ones((size, 1))
    return np.clip(stripes + rng.normal(0, 20, (size, size)), 0, 255)


def features(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Thirteen correlated features, like a profile's; ``shift`` moves brightness by that many SDs."""
    base = rng.normal(size=(n, 1))
    out = {f"f{i}": base[:, 0] * 0.7 + rng.normal(size=n) * 0.7 for i in range(12)}
    out["brightness"] = rng.normal(size=n) + shift
    return out


# --- Image statistics ---------------------------------------------------------------------------


def test_statistics_see_exposure_blur_size_and_channels():
    image = cell(0)
    plain = image_statistics(png(image))
    darker = image_statistics(png(image * 0.7))
    blurred_image = Image.fromarray(image.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    blurred = image_statistics(png(np.asarray(blurred_image)))
    rgb = image_statistics(png(np.repeat(image[:, :48, None], 3, axis=2), mode="RGB"))

    assert set(plain) == set(STATISTICS)
    assert darker["brightness"] == pytest.approx(plain["brightness"] * 0.7, rel=0.02)
    assert darker["contrast"] < plain["contrast"]
    assert blurred["sharpness"] < plain["sharpness"] - 0.5
    assert (plain["height"], plain["width"], plain["aspect"], plain["channels"]) == (64, 64, 1.0, 1)
    assert (rgb["width"], rgb["aspect"], rgb["channels"]) == (48, 0.75, 3)


def test_statistics_of_an_undecodable_file_say_why():
    from steps.served.serving import ImageError

    with pytest.raises(ImageError):
        image_statistics(b"not an image")


# --- The profile --------------------------------------------------------------------------------


def test_embedding_features_place_an_image_by_the_principal_directions_and_its_distance_from_them():
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(16, 16)))[0][:4]  # four orthonormal directions in 16 dimensions
    train = rng.normal(size=(300, 4)) * [4.0, 3.0, 2.0, 1.5] @ directions + rng.normal(scale=0.01, size=(300, 16))
    summary = fit_embedding(train)
    inside = summary.mean + 2.0 * directions[0]
    outside = summary.mean + 3.0 * np.linalg.qr(np.vstack([directions, rng.normal(size=(1, 16))]).T)[0][:, 4]
    got = embedding_features(summary, np.vstack([inside, outside]))

    assert set(got) == set(EMBEDDING)
    assert abs(got["embedding_pc1"][0]) == pytest.approx(2.0, abs=0.05)
    assert got[RESIDUAL][0] < 0.05 and got[RESIDUAL][1] == pytest.approx(3.0, abs=0.05)


def test_a_profile_round_trips_through_its_json_and_a_foreign_one_is_refused():
    rng = np.random.default_rng(1)
    stats = {name: rng.normal(size=50) for name in STATISTICS}
    profile = build_profile(stats, rng.uniform(size=50), rng.normal(size=(50, 32)), rng.normal(size=(80, 32)))
    again = Profile.from_json(profile.to_json())

    assert set(again.reference) == {*STATISTICS, SCORE, *EMBEDDING} and again.n_images == 50
    for name, values in profile.reference.items():
        np.testing.assert_allclose(again.reference[name], values, rtol=1e-5, atol=1e-12)
    assert again.embedding is not None and again.embedding.components.shape == (4, 32)
    assert len(profile.to_json()) < 50_000  # small: the profile travels inside every model
    with pytest.raises(ValueError, match=r"profile_version 99, this code reads 1"):
        Profile.from_json(profile.to_json().replace('"profile_version":1', '"profile_version":99'))
    with pytest.raises(ValueError, match=r"not a reference profile"):
        Profile.from_json("[1, 2]")


# --- The check ----------------------------------------------------------------------------------


def test_holm_adjusts_the_smallest_p_by_the_family_size_and_keeps_the_order():
    adjusted = drift.holm(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, 0.2])


def test_batches_drawn_like_the_reference_alarm_at_about_the_nominal_rate_not_once_per_feature():
    rng = np.random.default_rng(2)
    reference = features(rng, 400)
    verdicts = [drift.check(reference, features(rng, 100)).verdict for _ in range(200)]
    rate = verdicts.count(drift.ALERT) / len(verdicts)
    uncorrected = np.mean(
        [any(t.p_value < 0.05 for t in drift.check(reference, features(rng, 100)).tests) for _ in range(100)]
    )
    assert rate <= 0.10  # 13 features at 5% each, uncorrected, would alarm far more often:
    assert uncorrected > 2 * max(rate, 0.05)


def test_a_shifted_feature_raises_an_alert_naming_it():
    rng = np.random.default_rng(3)
    report = drift.check(features(rng, 400), features(rng, 100, shift=1.0))
    assert report.verdict == drift.ALERT
    assert report.alerts[0].feature == "brightness"
    assert report.summary().startswith("drift alert over 100 images, 13 features at alpha 0.05: brightness (KS ")
    metrics = report.metrics()
    assert metrics["drift_n_alerts"] >= 1 and metrics["drift_p_brightness"] < 0.05


def test_a_batch_too_small_to_judge_says_so_and_one_without_features_is_unavailable():
    rng = np.random.default_rng(4)
    small = drift.check(features(rng, 400), features(rng, 5))
    assert small.verdict == drift.TOO_FEW and not small.tests
    assert small.summary() == "drift too_few: 5 usable images, fewer than the 20 needed to judge a batch"
    assert drift.check(features(rng, 400), {}).verdict == drift.UNAVAILABLE
    with pytest.raises(ValueError, match=r"alpha: expected a number in \(0, 1\), got 1.5"):
        drift.check(features(rng, 400), features(rng, 50), alpha=1.5)


def test_a_batch_missing_the_embedding_is_checked_on_the_rest_and_says_what_it_left_out():
    rng = np.random.default_rng(5)
    reference = {**features(rng, 300), RESIDUAL: rng.normal(size=300)}
    report = drift.check(reference, features(rng, 60))
    assert report.verdict == drift.OK and report.not_checked == (RESIDUAL,)
    assert report.summary().endswith(f"; not checked: {RESIDUAL}")


def test_batch_features_skip_what_was_not_scored_and_embed_the_rest():
    rng = np.random.default_rng(6)
    summary = fit_embedding(rng.normal(size=(40, 8)))
    seen = []

    def embed(images: np.ndarray) -> np.ndarray:
        seen.append(images.shape)
        return images.reshape(len(images), -1)[:, :8]

    collector = BatchFeatures(16, embed, summary)
    collector.add([png(cell(1)), None, b"broken", png(cell(2))], [0.2, None, 0.9, 0.7])
    got = collector.features()

    assert collector.parts == ["statistics", "scores", "embedding"]
    assert set(got) == {*STATISTICS, SCORE, *EMBEDDING}
    np.testing.assert_allclose(got[SCORE], [0.2, 0.7])
    assert seen == [(2, 16, 16, 1)]  # resized to the model's input size, as it scores
    assert BatchFeatures(16).parts == ["statistics", "scores"]
