"""The loop after shipping, end to end on a small real-image set: `main`, a shifted batch that the drift check
flags, its review queue labelled, the labels added to the training data, `main` again (train reruns and the
new version faces the champion), and the unshifted images, which pass."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from helpers import TINY_SIZE, empty_store, in_process_stages, make_tiny_elpv
from steps import infer, label, main
from steps.core import contract
from steps.core.loader import load_config
from steps.datasets.elpv import elpv_labels, elpv_split
from steps.monitoring import drift, review

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLASSES = ("ok_front", "def_front")
# Enough images for a verdict: 16 validation images in the reference, batches of 30.
PER_CLASS = {"train": 40, "test": 6}
OUTSIDE = 15  # per class: ELPV training cells the small set does not hold


def outside_images(folder, factor: float) -> dict[str, str]:
    """Cells of ELPV's training split that the small set does not hold, exposure scaled by ``factor``;
    each file's true class, by name."""
    plan = elpv_split(elpv_labels(), CLASSES)
    rows = pd.concat(
        group.iloc[PER_CLASS["train"] : PER_CLASS["train"] + OUTSIDE]
        for (split, _), group in plan.groupby(["split", "class"])
        if split == "train"
    )
    folder.mkdir(parents=True)
    truth = {}
    for index, row in rows.iterrows():
        with Image.open(row["source"]) as image:
            small = image.convert("L").resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BILINEAR)
        small.point(lambda v: int(v * factor)).save(folder / f"{index:04d}.png")
        truth[f"{index:04d}.png"] = row["class"]
    return truth


def test_a_shifted_batch_is_flagged_reviewed_learned_from_and_the_next_model_faces_the_champion(tmp_path, monkeypatch):
    data = make_tiny_elpv(tmp_path / "data", PER_CLASS)
    store = empty_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(store)
    # Both mains in this process, their stages too (tests/e2e/test_e2e.py runs main through `mlflow run`).
    in_process_stages(monkeypatch)
    pipeline = {"data.dir": str(data), "train.hparams": "small", "train.epochs": "1", "train.image_size": "32",
                "evaluate.threshold": "0.0", "experiment": "loop",
                "infer.output": str(tmp_path / "main.csv")}  # fmt: skip
    main.main(load_config(pipeline))

    truth = outside_images(tmp_path / "dark", 0.4)
    outside_images(tmp_path / "plain", 1.0)
    config = {"data.dir": str(data), "experiment": "loop", "infer.review_top": "30"}
    shifted = infer.infer(load_config({**config, "infer.input": str(tmp_path / "dark"),
                                       "infer.output": str(tmp_path / "dark.csv"),
                                       "infer.review_dir": str(tmp_path / "queue")}))  # fmt: skip
    assert mlflow.get_run(shifted).data.tags[contract.TAG_DRIFT] == drift.ALERT

    queue = tmp_path / "queue" / shifted / review.QUEUE_CSV
    rows = pd.read_csv(queue, keep_default_na=False)
    rows[review.LABEL] = [truth[name.split("/")[-1]] for name in rows[review.SOURCE]]
    rows.to_csv(queue, index=False)
    added = label.label(load_config(config), str(queue))
    assert len(added) == 30

    main.main(load_config(pipeline))
    runs = mlflow.search_runs(experiment_names=["train/loop"], output_format="list")
    trains = [r for r in runs if contract.TAG_BEST_RUN_ID in r.data.tags]  # the stage runs, not the sets
    assert len(trains) == 2  # the new training data made train run again, not reuse the first
    (latest_eval, _) = mlflow.search_runs(experiment_names=["eval/loop"], order_by=["start_time DESC"],
                                          output_format="list")  # fmt: skip
    assert latest_eval.data.tags[contract.TAG_CHAMPION_VERSION] == "1"  # faced the version prod held

    plain = infer.infer(load_config({**config, "infer.input": str(tmp_path / "plain"),
                                     "infer.output": str(tmp_path / "plain.csv")}))  # fmt: skip
    assert mlflow.get_run(plain).data.tags[contract.TAG_DRIFT] == drift.OK
