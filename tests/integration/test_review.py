"""The review queue infer writes, and the reviewed labels that flow back into the training data (``label``)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import world_config
from helpers import make_tiny_elpv, use_copy_of
from steps import infer, label
from steps.core import contract
from steps.core.loader import load_config
from steps.datasets import intake
from steps.datasets.data import DataError, scan_split
from steps.monitoring import review

CLASSES = ("ok_front", "def_front")


def new_image(path: Path, seed: int) -> Path:
    """An image no data set holds: stripes at a random angle over noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:48, :48]
    angle = rng.uniform(0, np.pi)
    pixels = 120 + 60 * np.sin((x * np.cos(angle) + y * np.sin(angle)) / 2.5) + rng.normal(0, 15, (48, 48))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


def darkened(source: Path, path: Path, factor: float = 0.5) -> Path:
    with Image.open(source) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) * factor
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def filled_review(folder: Path, rows: list[tuple[Path, str]]) -> Path:
    """A review.csv as the queue writes it, its images copied beside it and its label column filled in."""
    (folder / review.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    with (folder / review.QUEUE_CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=review.COLUMNS)
        writer.writeheader()
        for i, (image, cls) in enumerate(rows):
            name = f"{review.IMAGES_DIR}/{i:03d}_{image.name}"
            shutil.copyfile(image, folder / name)
            origin = f"/line/camera1/{image.name}"
            writer.writerow({review.FILE: name, review.SOURCE: origin, review.LABEL: cls, "defect_probability": "0.5",
                             "decision_threshold": "0.5", "predicted_class": ""})  # fmt: skip
    return folder / review.QUEUE_CSV


def train_files(data: Path) -> set[str]:
    return {p.relative_to(data).as_posix() for p in (data / "train").rglob("*") if p.is_file()}


@pytest.fixture
def data(tmp_path) -> Path:
    return make_tiny_elpv(tmp_path / "data")


def config_on(data: Path):
    return load_config({"data.dir": str(data), "experiment": "review"})


# --- The queue --------------------------------------------------------------------------------


@pytest.mark.model
def test_infer_queues_the_images_nearest_the_cut_off_with_an_empty_label_column(prod_world, tmp_path, monkeypatch):
    db, _ = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    data = db.parent / "data"
    output, queue_dir = tmp_path / "predictions.csv", tmp_path / "to_review"
    config = world_config(data, tmp_path, **{"infer.review_top": "5", "infer.review_dir": str(queue_dir)})
    run_id = infer.infer(config)

    predictions = pd.read_csv(output)
    distance = (predictions["defect_probability"] - predictions["decision_threshold"]).abs()
    nearest = predictions.assign(distance=distance).sort_values("distance", kind="stable").head(5)
    queue = pd.read_csv(queue_dir / run_id / review.QUEUE_CSV, keep_default_na=False)
    assert list(queue.columns) == list(review.COLUMNS)
    assert list(queue[review.SOURCE]) == list(nearest["path"])
    assert set(queue[review.LABEL]) == {""}
    for row in queue.itertuples():
        assert (queue_dir / run_id / row.file).read_bytes() == Path(row.source).read_bytes()
    assert (queue_dir / run_id / review.GRADCAM_FILE).is_file()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, contract.REVIEW_ARTIFACT)}
    assert {
        f"{contract.REVIEW_ARTIFACT}/{review.QUEUE_CSV}",
        f"{contract.REVIEW_ARTIFACT}/{review.GRADCAM_FILE}",
    } <= logged
    assert mlflow.get_run(run_id).data.metrics[contract.METRIC_N_REVIEW] == 5


# --- Labels flowing back ------------------------------------------------------------------------


@pytest.mark.data
def test_labelled_images_join_the_training_data_with_their_origin_and_soft_label(data, tmp_path, store):
    images = [new_image(tmp_path / "new" / f"n{i}.png", i) for i in range(3)]
    csv_path = filled_review(tmp_path / "queue", [(images[0], "def_front"), (images[1], "ok_front"), (images[2], "")])
    before = train_files(data)

    records = label.label(config_on(data), str(csv_path))

    added = train_files(data) - before
    assert len(records) == 2 and added == {r["file"] for r in records}  # the unlabelled row is left out
    assert {r["class"] for r in records} == {"def_front", "ok_front"}
    assert all(Path(r["file"]).parent.name == r["class"] and r["source"].startswith("/line/camera1/") for r in records)
    reviewed = pd.read_csv(data / intake.REVIEWED_CSV)
    assert set(reviewed["file"]) == added and set(reviewed["review"]) == {str(csv_path)}
    manifest = pd.read_csv(data / "manifest.csv").set_index("file")
    assert {manifest.loc[r["file"], "probability"] for r in records} == {1.0, 0.0}
    from steps.datasets.data import expert_probabilities

    assert expert_probabilities(data, scan_split(data, "train", CLASSES)) is not None  # soft labels still cover all
    (run,) = mlflow.search_runs(experiment_names=["label/review"], output_format="list")
    assert run.data.metrics[contract.METRIC_N_LABELLED] == 2 and run.data.tags[contract.TAG_DATA_DIGEST]


@pytest.mark.data
def test_a_folder_per_class_is_a_review_too(data, tmp_path, store):
    new_image(tmp_path / "reviewed" / "def_front" / "a.png", 10)
    new_image(tmp_path / "reviewed" / "ok_front" / "b.png", 11)
    records = label.label(config_on(data), str(tmp_path / "reviewed"))
    assert sorted(r["class"] for r in records) == ["def_front", "ok_front"]


@pytest.mark.data
@pytest.mark.parametrize(
    "case, refused",
    [
        ("a test image", r"is already in test as .*/test/"),
        ("a training image", r"is already in train as .*/train/"),
        ("a darkened test image", r"is a near-copy of the test image .* \(similarity 0\.99\d+ >= 0.995\)"),
        ("the same image twice", r"is the same image as queue.csv line 2"),
        ("not an image", r"is not a usable image"),
    ],
)
def test_a_review_with_one_bad_image_adds_nothing_and_names_it(case, refused, data, tmp_path, store):
    test_image = sorted((data / "test" / "def_front").iterdir())[0]
    fresh = new_image(tmp_path / "new" / "fresh.png", 20)
    bad = {
        "a test image": lambda: test_image,
        "a training image": lambda: sorted((data / "train" / "ok_front").iterdir())[0],
        "a darkened test image": lambda: darkened(test_image, tmp_path / "new" / "dark.png"),
        "the same image twice": lambda: fresh,
        "not an image": lambda: (tmp_path / "new" / "junk.png").write_bytes(b"junk") and tmp_path / "new" / "junk.png",
    }[case]()
    rows = [(fresh, "ok_front"), (bad, "def_front")]
    csv_path = filled_review(tmp_path / "q", rows).rename(tmp_path / "q" / "queue.csv")
    before = train_files(data)
    with pytest.raises(DataError, match=rf"^nothing added: 1 of 2 images refused: queue.csv line 3: .*{refused}"):
        label.label(config_on(data), str(csv_path))
    assert train_files(data) == before and not (data / intake.REVIEWED_CSV).exists()


@pytest.mark.data
@pytest.mark.parametrize(
    "content, refused",
    [
        ("file,label\nimages/a.png,scratch\n", r"line 2: label 'scratch' is no class; expected ok_front or def_front"),
        ("file,label\nimages/a.png,\n", r"no row has a label; fill in the label column with a class name"),
        ("path,class\na.png,ok_front\n", r"expected the columns file and label"),
    ],
)
def test_a_review_csv_that_cannot_be_read_says_why(content, refused, data, tmp_path, store):
    (tmp_path / "review.csv").write_text(content)
    with pytest.raises(DataError, match=refused):
        label.label(config_on(data), str(tmp_path / "review.csv"))
    with pytest.raises(DataError, match=r"no such file or folder"):
        label.label(config_on(data), str(tmp_path / "missing.csv"))


@pytest.mark.data
def test_a_failure_part_way_takes_back_what_was_added(data, tmp_path, store, monkeypatch):
    images = [new_image(tmp_path / "new" / f"n{i}.png", 30 + i) for i in range(3)]
    csv_path = filled_review(tmp_path / "queue", [(p, "ok_front") for p in images])
    before, manifest = train_files(data), (data / "manifest.csv").read_bytes()
    copies = []
    real_copy = shutil.copyfile

    def copy_then_fail(src, dst):
        copies.append(dst)
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(intake.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        label.label(config_on(data), str(csv_path))
    assert train_files(data) == before and (data / "manifest.csv").read_bytes() == manifest
    assert not (data / intake.REVIEWED_CSV).exists()
