"""The training input pipeline (steps.datasets.batches) and the decoded-image cache (steps.datasets.data)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf

from steps.datasets import data
from steps.datasets.batches import augment, eval_batches, image_batches, training_batches
from steps.datasets.stored import Rows

pytestmark = pytest.mark.unit


def symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The eight images a square maps to under flips and transposes."""
    out = []
    for turned in (image, image.transpose(1, 0, 2)):
        for flipped in (turned, turned[::-1], turned[:, ::-1], turned[::-1, ::-1]):
            out.append(flipped)
    return out


def test_each_epoch_sees_every_image_once_in_a_new_order():
    images = np.arange(10, dtype="float32").reshape(10, 1, 1, 1) * np.ones((1, 4, 4, 1), "float32")
    labels = np.arange(10, dtype="float32")
    batches, steps = training_batches(images, labels, batch_size=4, seed=3, mode="none")
    assert steps == 3
    seen = [y.numpy().astype(int).tolist() for _, y in batches.take(3 * steps)]
    epochs = [sum(seen[e * steps : (e + 1) * steps], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert epochs[0] != epochs[1]
    assert [len(b) for b in seen[:steps]] == [4, 4, 2]  # batched within the epoch


def test_the_same_seed_gives_the_same_batches_and_another_seed_other_ones():
    images = np.random.default_rng(0).uniform(0, 255, (12, 8, 8, 1)).astype("float32")
    labels = np.zeros(12, "float32")

    def first_batches(seed):
        batches, _ = training_batches(images, labels, batch_size=4, seed=seed, mode="dihedral")
        return np.concatenate([x.numpy() for x, _ in batches.take(6)])

    np.testing.assert_array_equal(first_batches(7), first_batches(7))
    assert not np.array_equal(first_batches(7), first_batches(8))


@pytest.mark.parametrize(("mode", "count"), [("none", 1), ("flips", 4), ("dihedral", 8)])
def test_augmentation_only_flips_and_transposes_each_image(mode, count):
    image = np.arange(25, dtype="float32").reshape(5, 5, 1)  # no symmetry of its own: 8 distinct images
    batch = np.repeat(image[None], 200, axis=0)
    out = np.asarray(augment(tf.constant(batch), tf.constant([1, 2], tf.int64), mode))
    allowed = symmetries(image)[: {"none": 1, "flips": 4, "dihedral": 8}[mode]]
    found = {next(i for i, a in enumerate(allowed) if np.array_equal(o, a)) for o in out}  # StopIteration: other
    assert len(found) == count  # 200 draws reach every allowed symmetry


def test_rows_of_a_memory_map_give_the_batches_the_same_images_in_memory_give(tmp_path):
    images = np.random.default_rng(1).uniform(0, 255, (20, 6, 6, 1)).astype("float32")
    labels = np.arange(20, dtype="float32")
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = np.array([3, 17, 0, 9, 12, 5, 19, 8, 1, 14])

    def batches(source):
        dataset, steps = training_batches(source, labels[rows], batch_size=4, seed=5, mode="dihedral")
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(2 * steps)]

    streamed, in_memory = batches(Rows(mapped).take(rows)), batches(images[rows])
    for (x, y), (x0, y0) in zip(streamed, in_memory, strict=True):
        np.testing.assert_array_equal(x, x0)
        np.testing.assert_array_equal(y, y0)
    # eval and predict batches: in order, the rows asked for
    pairs = list(eval_batches(Rows(mapped).take(rows), labels[rows], 3))
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in pairs]), images[rows])
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in pairs]), labels[rows])
    only = np.concatenate([x.numpy() for x in image_batches(Rows(mapped).take(rows), 3)])
    np.testing.assert_array_equal(only, images[rows])


def test_rows_read_what_numpy_indexing_reads(tmp_path):
    images = np.arange(7 * 3 * 3, dtype="float32").reshape(7, 3, 3, 1)
    view = Rows(images).take([6, 2, 4, 0])
    assert len(view) == 4 and view.shape == (4, 3, 3, 1) and view.dtype == np.float32
    expected = images[[6, 2, 4, 0]]
    np.testing.assert_array_equal(view[1], expected[1])
    np.testing.assert_array_equal(view[::2], expected[::2])
    np.testing.assert_array_equal(view[np.array([3, 1])], expected[[3, 1]])
    np.testing.assert_array_equal(view[2, :, :, 0], expected[2, :, :, 0])
    np.testing.assert_array_equal(view[1:3, 0], expected[1:3, 0])
    np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(view.take([1, 0])[0], images[2])


def test_a_split_is_decoded_into_a_mapped_file_not_into_memory(tiny_data, cache):
    samples = data.scan_split(tiny_data, "train", ("ok_front", "def_front"))
    for cached in (True, False):
        images, kept, _ = data.load_split(samples, 16, "train", skip_bad=False, cache=cached)
        assert isinstance(images, Rows) and isinstance(images.base, np.memmap)
        assert images.shape == (len(kept), 16, 16, 1)
    # The cached entry and its failures; the uncached decode left no file behind.
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]


def test_training_images_must_be_square():
    with pytest.raises(ValueError, match="training images must be square, got 4x6"):
        training_batches(np.zeros((2, 4, 6, 1), "float32"), np.zeros(2, "float32"), 2, 0, "flips")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFECT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_second_load_reads_the_cache_and_a_changed_file_misses_it(tiny_data, tmp_path, cache, monkeypatch):
    files = sorted((tiny_data / "train").rglob("*.png"))[:4]
    paths = []
    for i, f in enumerate(files):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(f.read_bytes())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.append(tmp_path / "bad.png")
    first, failures = data.load_images(paths, 16, progress=False, cache=True)
    assert list(failures) == [4] and len(list(cache.glob("*.npy"))) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(data, "_decode_all", no_decoding)
        again, failures_again = data.load_images(paths, 16, progress=False, cache=True)
    np.testing.assert_array_equal(again, first)
    assert failures_again == failures
    # Keyed by content: the same bytes under another name hit it, changed bytes miss it.
    paths[0].write_bytes(files[-1].read_bytes())
    changed, _ = data.load_images(paths, 16, progress=False, cache=True)
    assert not np.array_equal(changed[0], first[0]) and len(list(cache.glob("*.npy"))) == 2


def test_a_damaged_cache_file_is_decoded_again_with_a_warning(tiny_data, cache, caplog):
    paths = sorted((tiny_data / "test").rglob("*.png"))[:3]
    first = np.array(data.load_images(paths, 16, progress=False, cache=True)[0])  # a copy: the file is damaged next
    (stored,) = cache.glob("*.npy")
    stored.write_bytes(stored.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="steps.datasets.data"):
        again, _ = data.load_images(paths, 16, progress=False, cache=True)
    np.testing.assert_array_equal(again, first)
    assert "ignoring the unreadable cache file" in caplog.text


def test_a_cache_that_cannot_be_written_leaves_no_file_and_loses_nothing(tiny_data, cache, monkeypatch, caplog):
    paths = sorted((tiny_data / "test").rglob("*.png"))[:3]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.np.lib.format, "open_memmap", disk_full)
    with caplog.at_level(logging.WARNING, logger="steps.datasets.data"):
        images, failures = data.load_images(paths, 16, progress=False, cache=True)
    assert images.shape == (3, 16, 16, 1) and failures == {}
    assert "could not cache the decoded images" in caplog.text
    assert list(cache.iterdir()) == []
