"""Unit and data: splits, the ELPV layout, scanning and decoding real image files."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steps.core.loader import load_config
from steps.datasets import elpv
from steps.datasets.data import DataError, digest, manifest, scan_split, stratified_split
from steps.network.training import split_train_val
from steps.served.serving import decode_gray

CLASSES = ("ok_front", "def_front")


@pytest.mark.unit
def test_stratified_split_is_deterministic_exact_and_disjoint():
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 7
    keep, held = stratified_split(strata, 0.25, seed=3)
    assert (keep, held) == stratified_split(strata, 0.25, seed=3)
    assert stratified_split(strata, 0.25, seed=4) != (keep, held)
    assert len(held) == round(len(strata) * 0.25)
    assert set(keep).isdisjoint(held) and sorted(keep + held) == list(range(len(strata)))
    per_stratum = Counter(strata[i] for i in held)
    for key, n in Counter(strata).items():
        assert abs(per_stratum[key] - n * 0.25) < 1


@pytest.mark.unit
def test_stratified_split_rejects_a_fraction_outside_0_1():
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(["a", "b"], 1.0, seed=0)


@pytest.mark.unit
def test_elpv_plan_follows_the_protocol():
    labels = elpv.elpv_labels()
    plan = elpv.elpv_split(labels, CLASSES)
    assert len(plan) == 2624
    assert Counter(plan["split"]) == {"train": 1968, "test": 656}
    assert (plan["class"] == np.where(plan["probability"] >= 0.5, "def_front", "ok_front")).all()
    # Stratified by probability and cell type: every stratum within one image of 25 %.
    for _, group in plan.groupby(["probability", "type"]):
        assert abs((group["split"] == "test").sum() - len(group) * 0.25) < 1
    assert plan.equals(elpv.elpv_split(labels, CLASSES))  # the same files every time


@pytest.mark.unit
def test_validation_split_keeps_both_classes_and_never_touches_test(tiny_data):
    samples = scan_split(tiny_data, "train", CLASSES)
    fit, val = split_train_val(samples, 0.2, seed=1)
    assert {samples[i].label for i in val} == {0, 1}
    assert set(fit).isdisjoint(val) and sorted(fit + val) == list(range(len(samples)))
    test_paths = {s.path for s in scan_split(tiny_data, "test", CLASSES)}
    assert test_paths.isdisjoint(samples[i].path for i in fit + val)


@pytest.mark.data
def test_materialize_elpv_copies_the_real_files_once(tmp_path):
    data_dir = tmp_path / "data"
    manifest_frame = elpv.materialize_elpv(data_dir, CLASSES)
    assert Counter(manifest_frame["split"]) == {"train": 1968, "test": 656}
    for split in ("train", "test"):
        assert len(scan_split(data_dir, split, CLASSES)) == (manifest_frame["split"] == split).sum()
    row = manifest_frame.iloc[0]
    source = Path(elpv.elpv_labels()["source"][0])
    assert (data_dir / row["file"]).read_bytes() == source.read_bytes()  # the original bytes
    assert (data_dir / "manifest.csv").is_file()
    assert not list(data_dir.glob(".elpv-staging-*"))


@pytest.mark.data
def test_ensure_data_fills_only_the_projects_own_empty_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(elpv, "PROJECT_DIR", tmp_path)
    (tmp_path / "data" / "train" / "ok_front").mkdir(parents=True)  # empty folders are fine
    config = load_config({"data.dir": str(tmp_path / "data")})
    assert elpv.ensure_data(config) == (tmp_path / "data").resolve()
    assert len(scan_split(tmp_path / "data", "test", CLASSES)) == 656


@pytest.mark.data
def test_ensure_data_never_overwrites_user_images(tmp_path, monkeypatch):
    monkeypatch.setattr(elpv, "PROJECT_DIR", tmp_path)
    mine = tmp_path / "data" / "train" / "ok_front" / "mine.png"
    mine.parent.mkdir(parents=True)
    Image.new("L", (8, 8), 200).save(mine)
    before = hashlib.sha256(mine.read_bytes()).hexdigest()
    config = load_config({"data.dir": str(tmp_path / "data")})
    elpv.ensure_data(config)
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == before
    assert [p.name for p in (tmp_path / "data").rglob("*.png")] == ["mine.png"]
    with pytest.raises(DataError, match=r"no class folder 'def_front'.*expected one folder per class"):
        scan_split(tmp_path / "data", "train", CLASSES)


@pytest.mark.data
def test_another_empty_data_dir_is_an_error_naming_the_layout(tmp_path):
    config = load_config({"data.dir": str(tmp_path / "mine")})
    with pytest.raises(DataError) as err:
        elpv.ensure_data(config)
    message = str(err.value)
    assert f"data.dir (-P data_dir): {(tmp_path / 'mine').resolve()} is not a directory" in message
    assert f"{(tmp_path / 'mine').resolve()}/train/def_front/" in message
    assert f"{(tmp_path / 'mine').resolve()}/test/ok_front/" in message


@pytest.mark.data
def test_a_class_folder_without_images_is_an_error_naming_the_layout(tmp_path):
    for cls in CLASSES:
        (tmp_path / "train" / cls).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "train" / "ok_front" / "a.png")
    (tmp_path / "train" / "def_front" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"def_front: no images; expected one folder per class"):
        scan_split(tmp_path, "train", CLASSES)


@pytest.mark.data
@pytest.mark.parametrize(
    ("mode", "suffix", "value"),
    [
        ("L", ".png", 128),
        ("RGB", ".jpg", (128, 128, 128)),
        ("RGBA", ".png", (128, 128, 128, 255)),
        ("P", ".png", 5),
        ("I;16", ".png", 128 * 257),
        ("L", ".bmp", 128),
        ("RGB", ".tiff", (128, 128, 128)),
    ],
)
def test_decode_gray_turns_every_format_into_8_bit_grayscale(tmp_path, mode, suffix, value):
    path = tmp_path / f"image{suffix}"
    image = Image.new(mode, (20, 10), value)
    if mode == "P":
        image.putpalette([128, 128, 128] * 256)
    image.save(path)
    gray = decode_gray(path)
    assert gray.shape == (10, 20, 1) and gray.dtype == np.uint8
    assert abs(int(gray.mean()) - 128) <= 1


@pytest.mark.unit
def test_digest_depends_on_content_and_labels_not_order_or_place(tiny_data, tmp_path):
    samples = scan_split(tiny_data, "test", CLASSES)
    frame = manifest(samples, "test", tiny_data)
    assert digest(frame) == digest(frame.iloc[::-1])
    relabelled = frame.assign(**{"class": frame["class"][::-1].to_numpy()})
    assert digest(relabelled) != digest(frame)
    assert len(digest(frame)) == 16


@pytest.mark.data
def test_the_experts_probabilities_come_from_the_manifest_and_agree_with_the_folders(tiny_data, tmp_path):
    from steps.datasets.data import expert_probabilities

    samples = scan_split(tiny_data, "train", ("ok_front", "def_front"))
    known = expert_probabilities(tiny_data, samples)
    assert known is not None and all(round(float(p) * 3) / 3 == pytest.approx(float(p)) for p in known)  # k/3
    assert ((known >= 0.5) == np.array([s.label for s in samples], bool)).all()  # the folders hold the same labels
    assert expert_probabilities(tmp_path, samples) is None  # no manifest: folder labels only


@pytest.mark.model
def test_a_set_with_soft_labels_trains_on_the_experts_probabilities(tiny_data, tmp_path, store, monkeypatch):
    import dataclasses
    import shutil

    import pandas as pd

    from steps import train

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    frame = pd.read_csv(data / "manifest.csv")
    unsure = (frame["split"] == "train") & (frame["class"] == "def_front")
    frame.loc[frame.index[unsure][:3], "probability"] = 2 / 3  # three defects the experts were unsure of
    frame.to_csv(data / "manifest.csv", index=False)
    seen = {}

    def fake_fit_one(name, hp, config, train_xy, val_xy, val_statistics=None, session=None):
        seen[name] = (train_xy[1].copy(), val_xy[1].copy())
        return f"{len(seen):032x}", 0.5, 0.5

    monkeypatch.setattr(train, "fit_one", fake_fit_one)
    config = load_config({"data.dir": str(data), "train.hparams": "small,medium,wide", "experiment": "soft"})
    sets = dict(
        config.hparam_sets,
        small=dataclasses.replace(config.hparam_sets["small"], soft_labels=True),
        wide=dataclasses.replace(config.hparam_sets["wide"], soft_labels=True, soft_weight=0.3),
    )
    train.train(dataclasses.replace(config, hparam_sets=sets))
    (soft, soft_val), (hard, hard_val), (mixed, _) = seen["small"], seen["medium"], seen["wide"]
    # soft_weight 0.3: 0.3 of the experts' 2/3 and 0.7 of the folder's 1.
    np.testing.assert_allclose(mixed, 0.3 * soft + 0.7 * hard, rtol=1e-6)
    assert np.isclose(mixed[np.isclose(soft, 2 / 3)], 0.9).all()
    assert set(np.unique(hard)) == {0.0, 1.0} and set(np.unique(hard_val)) <= {0.0, 1.0}
    assert np.isclose(soft, 2 / 3).sum() >= 1  # those in the fitting part keep the experts' doubt
    assert ((soft >= 0.5) == (hard == 1)).all() and (soft_val == hard_val).all()  # validation: folder labels
