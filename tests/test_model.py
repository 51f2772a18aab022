"""Model behaviour: the factory, preprocessing inside the model, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from steps.config import load_config
from steps.data import decode_gray, load_images, scan_split
from steps.model import make_model, set_seed
from steps.serving import resize

pytestmark = pytest.mark.model
HP = load_config().hparam_sets["small"]


def test_model_outputs_one_probability_per_image_at_any_input_size():
    set_seed(0)
    model = make_model(HP, 32, seed=0)
    for size in (32, 48, 300):
        prob = model.predict(np.full((3, size, size, 1), 127.0, "float32"), verbose=0)
        assert prob.shape == (3, 1)
        assert ((prob >= 0) & (prob <= 1)).all()


def test_training_preprocessing_equals_serving_preprocessing(tiny_data):
    """Images resized by the data loader and raw images resized inside the model score the same."""
    paths = [s.path for s in scan_split(tiny_data, "test", ("ok_front", "def_front"))][:6]
    set_seed(0)
    model = make_model(HP, 32, seed=0)
    raw = np.stack([decode_gray(p) for p in paths]).astype("float32")  # 48x48, resized by the model
    loaded, failures = load_images(paths, 32, progress=False)  # resized by the loader
    assert failures == {}
    assert loaded.shape == (6, 32, 32, 1)
    np.testing.assert_allclose(model.predict(raw, verbose=0), model.predict(loaded, verbose=0), atol=1e-5)


def test_resize_leaves_an_image_of_the_target_size_unchanged():
    image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(resize(image, 16), image.astype("float32"))


def test_same_seed_gives_the_same_initial_weights():
    set_seed(5)
    first = make_model(HP, 32, seed=5).get_weights()
    set_seed(5)
    second = make_model(HP, 32, seed=5).get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
