"""Benchmark: the drift check's false alarms, what it detects, and what it costs infer.

Run with ``make bench-drift`` (``ARGS=--quick`` for a smoke check on a tiny subset). The first set of
the pipeline is trained as ``train`` trains it (``steps.network.training.fit``), with its reference
profile from the validation images (``reference_profile``); the network and profile are kept in
``bench-out/drift/`` for reruns on the same machine. Then, with infer's own code (the served model,
``steps.monitoring.collect.BatchFeatures``, ``steps.monitoring.drift.check``):

- false alarms: random batches of ``--batch`` held-out test images, unchanged, at a nominal 5%;
- detection: the same batches after a change to every image: exposure (x0.7 and x1.3, and smaller
  steps), Gaussian blur, JPEG compression, added sensor noise, and images of another source altogether
  (crops of the photographs scikit-learn and matplotlib ship), each rate with its 95% interval;
- cost: ``infer`` on the test folder with ``drift=off`` and ``drift=report``, alternated, in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_accuracy import bench_config, split_images  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402
from steps.core.config import Config  # noqa: E402
from steps.datasets.data import expert_probabilities  # noqa: E402
from steps.monitoring import drift  # noqa: E402
from steps.monitoring.collect import BatchFeatures  # noqa: E402
from steps.monitoring.profile import Profile, image_statistics, stack  # noqa: E402
from steps.network.model import embedding_model, resolve_precision, with_tta  # noqa: E402
from steps.network.statistics import wilson_interval  # noqa: E402
from steps.network.training import fit, reference_profile, split_train_val  # noqa: E402
from steps.served import packaging  # noqa: E402
from steps.served.serving import DefectModel  # noqa: E402

BEGIN, END = "<!-- drift:begin -->", "<!-- drift:end -->"
CACHE = PROJECT_DIR / "bench-out" / "drift"


def png(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def exposure(factor: float) -> Callable[[np.ndarray, np.random.Generator], bytes]:
    return lambda g, rng: png(g.astype(np.float32) * factor)


def blur(radius: float) -> Callable[[np.ndarray, np.random.Generator], bytes]:
    return lambda g, rng: png(np.asarray(Image.fromarray(g).filter(ImageFilter.GaussianBlur(radius))))


def jpeg(quality: int) -> Callable[[np.ndarray, np.random.Generator], bytes]:
    def change(g: np.ndarray, rng: np.random.Generator) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(g).save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue()

    return change


def noise(sigma: float) -> Callable[[np.ndarray, np.random.Generator], bytes]:
    return lambda g, rng: png(g.astype(np.float32) + rng.normal(0, sigma, g.shape))


# The changes, by family, mildest first; the named ones are exposure x0.7 and x1.3, blur,
# heavy JPEG and noise.
CHANGES: dict[str, list[tuple[str, Callable[[np.ndarray, np.random.Generator], bytes]]]] = {
    "exposure": [(f"x{f}", exposure(f)) for f in (0.95, 1.05, 0.9, 1.1, 0.8, 1.2, 0.7, 1.3)],
    "blur": [(f"radius {r}", blur(r)) for r in (0.5, 1.0, 2.0)],
    "JPEG": [(f"quality {q}", jpeg(q)) for q in (50, 30, 10)],
    "noise": [(f"sigma {s}", noise(s)) for s in (2.0, 5.0, 10.0)],
}


def other_source(n: int, size: int, rng: np.random.Generator) -> list[bytes]:
    """``n`` gray crops of the photographs that installed packages ship (scikit-learn's two sample
    images and matplotlib's Grace Hopper), each resized to ``size`` px: another camera, another subject."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(Image.fromarray(p).convert("L")) for p in load_sample_images().images]
    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg") as image:
        photos.append(np.asarray(image.convert("L")))
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape) // 3, min(photo.shape)))
        top, left = (int(rng.integers(0, d - side + 1)) for d in photo.shape)
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize(
            (size, size), Image.Resampling.BILINEAR
        )
        out.append(png(np.asarray(crop)))
    return out


def model_and_profile(config: Config, quick: bool) -> tuple[Any, Profile, int]:
    """The first set, trained as train trains it, with its reference profile (cached unless quick)."""
    import keras

    name, hp = next(iter(config.selected_hparams().items()))
    data_dir, train_samples, _, images = split_images(config)
    key = json.dumps([dataclasses.asdict(hp), config.seed, len(train_samples), machine()], sort_keys=True)
    stem = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not quick and stem.with_suffix(".keras").exists():
        network = keras.saving.load_model(stem.with_suffix(".keras"), compile=False, safe_mode=True)
        return network, Profile.from_json(stem.with_suffix(".json").read_text()), hp.image_size
    train_x, _ = images(hp.image_size)
    fit_rows, val_rows = split_train_val(train_samples, config.data.val_fraction, config.seed)
    labels = np.array([s.label for s in train_samples], "float32")
    soft = expert_probabilities(data_dir, train_samples) if hp.soft_labels else None
    targets = soft if soft is not None else labels
    val_xy = (train_x[val_rows], labels[val_rows])
    print(f"training {name} for the benchmark: {hp}", flush=True)
    precision = resolve_precision(config.train.precision)
    network, _, _ = fit(hp, config.seed, precision, (train_x[fit_rows], targets[fit_rows]), val_xy, 64)
    model = with_tta(network, hp)
    val_prob = model.predict(val_xy[0].astype("float32"), batch_size=64, verbose=0).reshape(-1)
    val_stats = stack([image_statistics(train_samples[i].path.read_bytes()) for i in val_rows])
    profile = reference_profile(network, val_stats, val_prob, train_x[fit_rows], val_xy[0], config)
    if not quick:
        CACHE.mkdir(parents=True, exist_ok=True)
        model.save(stem.with_suffix(".keras"))
        stem.with_suffix(".json").write_text(profile.to_json())
    return model, profile, hp.image_size


def features_of(model: DefectModel, sources: list[bytes], profile: Profile) -> dict[str, np.ndarray]:
    """Each image's features, as infer gathers them (one row per image, in order)."""
    network = embedding_model(model.network)
    collector = BatchFeatures(model.image_size, lambda x: network.predict(x, batch_size=64, verbose=0),
                              profile.embedding)  # fmt: skip
    for start in range(0, len(sources), 256):
        chunk = sources[start : start + 256]
        scored = model.predict(None, pd.DataFrame({"image": chunk}), params={"on_error": "row"})
        collector.add(chunk, scored["defect_probability"].tolist())
    return collector.features()


def alarm_rate(
    reference: Profile, feats: dict[str, np.ndarray], batch: int, batches: int, seed: int, min_images: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    n = len(next(iter(feats.values())))
    alerts = 0
    for _ in range(batches):
        rows = rng.choice(n, size=min(batch, n), replace=False)
        verdict = drift.check(reference.reference, {k: v[rows] for k, v in feats.items()}, min_images=min_images)
        alerts += verdict.verdict == drift.ALERT
    low, high = wilson_interval(alerts, batches)
    return {"rate": alerts / batches, "low": low, "high": high, "alerts": alerts}


def infer_cost(model: Any, profile: Profile, image_size: int, test_dir: Path, rounds: int) -> dict[str, float]:
    """infer on ``test_dir`` with the check off and on, alternated, in a temporary store: seconds each."""
    import mlflow

    from steps import infer
    from steps.core.loader import load_config

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        config = load_config({"experiment": "bench-drift"})
        metadata = {"classes": list(config.data.classes), "image_size": image_size, "decision_threshold": 0.5}
        with mlflow.start_run() as run:
            example = np.zeros((image_size, image_size, 1), "float32")
            packaging.log_model(model, config, metadata, example, exports=None, profile=profile)
        uri = f"runs:/{run.info.run_id}/model"
        seconds: dict[str, list[float]] = {"off": [], "report": []}
        for _ in range(rounds):
            for mode in seconds:
                values = {"infer.model_uri": uri, "infer.input": str(test_dir), "infer.drift": mode,
                          "infer.output": f"{tmp}/p.csv", "infer.gradcam_top": "0", "infer.review_top": "0",
                          "experiment": "bench-drift"}  # fmt: skip
                started = time.perf_counter()
                infer.infer(load_config(values))
                seconds[mode].append(time.perf_counter() - started)
    return {mode: float(np.median(values)) for mode, values in seconds.items()}


def measure(config: Config, quick: bool, batch: int, batches: int, rounds: int) -> dict[str, Any]:
    at_least = 4 if quick else drift.MIN_IMAGES  # the tiny subset's batches are too small to judge
    network, profile, size = model_and_profile(config, quick)
    model = DefectModel(network, packaging.model_config({"classes": list(config.data.classes), "image_size": size},
                                                        64, max_request_pixels=0))  # fmt: skip
    data_dir, _, test_samples, _ = split_images(config)
    grays = [np.asarray(Image.open(s.path).convert("L")) for s in test_samples]
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    rows = []
    plain = features_of(model, [s.path.read_bytes() for s in test_samples], profile)
    rows.append(
        {"family": "none", "change": "held-out test images", **alarm_rate(profile, plain, batch, batches, 1, at_least)}
    )
    for family, changes in CHANGES.items():
        for label, change in changes:
            feats = features_of(model, [change(g, rng) for g in grays], profile)
            rows.append({"family": family, "change": label, **alarm_rate(profile, feats, batch, batches, 2, at_least)})
            print(rows[-1], flush=True)
    foreign = features_of(model, other_source(len(grays), grays[0].shape[0], rng), profile)
    other = alarm_rate(profile, foreign, batch, batches, 3, at_least)
    rows.append({"family": "other source", "change": "photograph crops", **other})
    seconds = time.perf_counter() - started
    cost = infer_cost(network, profile, size, data_dir / "test", rounds)
    return {"rows": rows, "n_test": len(grays), "n_reference": profile.n_images, "batch": batch,
            "batches": batches, "cost": cost, "features_seconds": seconds, "quick": quick}  # fmt: skip


def report(result: dict[str, Any], command: str) -> str:
    lines = [
        BEGIN,
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}.",
        f"Reference: the {result['n_reference']} validation images of the first default set's model; "
        f"{result['batches']} random batches of {result['batch']} drawn from the {result['n_test']} test images "
        f"(changed as the row says), each checked at alpha {drift.ALPHA} (Holm over the features). "
        "The rate is the share of batches that raised an alert, with its 95% Wilson interval.",
        "",
        "| change | to every image | alert rate [95%] |",
        "| --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['change']} | **{r['rate']:.3f}** [{r['low']:.3f}, {r['high']:.3f}] |")
    cost = result["cost"]
    lines += [
        "",
        f"infer on the {result['n_test']} test images (median of alternated runs): {cost['off']:.1f} s without the "
        f"check, {cost['report']:.1f} s with it: **{cost['report'] / cost['off']:.2f}x**.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke check on a tiny subset")
    parser.add_argument("--write", action="store_true", help="replace the drift section of BENCHMARKS.md")
    parser.add_argument("--batch", type=int, default=100, help="images per batch (default 100)")
    parser.add_argument("--batches", type=int, default=200, help="batches per change (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated infer runs per mode (default 3)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(options.quick, Path(tmp), "")
        batch = min(options.batch, 8) if options.quick else options.batch
        batches = min(options.batches, 5) if options.quick else options.batches
        result = measure(config, options.quick, batch, batches, 1 if options.quick else options.rounds)
    args = " ".join(a for a in sys.argv[1:] if a != "--write")
    publish(report(result, f"make bench-drift{f' ARGS={args!r}' if args else ''}"), BEGIN, END, options.write,
            options.quick)  # fmt: skip


if __name__ == "__main__":
    main()
