"""Model behaviour: the factory, preprocessing inside the model, seeds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from steps.core.config import HParams
from steps.core.loader import load_config
from steps.datasets.data import load_images, scan_split
from steps.network import model as model_module
from steps.network.model import forward_flops, learning_rate, make_model, resolve_precision, schedule, set_seed
from steps.served.serving import decode_gray, resize

pytestmark = pytest.mark.model
HP = dataclasses.replace(load_config().hparam_sets["small"], image_size=32)


def test_model_outputs_one_probability_per_image_at_any_input_size():
    set_seed(0)
    model = make_model(HP, seed=0)
    for size in (32, 48, 300):
        prob = model.predict(np.full((3, size, size, 1), 127.0, "float32"), verbose=0)
        assert prob.shape == (3, 1)
        assert ((prob >= 0) & (prob <= 1)).all()


def test_training_preprocessing_equals_serving_preprocessing(tiny_data):
    """Images resized by the data loader and raw images resized inside the model score the same."""
    paths = [s.path for s in scan_split(tiny_data, "test", ("ok_front", "def_front"))][:6]
    set_seed(0)
    model = make_model(HP, seed=0)
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
    first = make_model(HP, seed=5).get_weights()
    set_seed(5)
    second = make_model(HP, seed=5).get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_traces_the_training_step_once_and_trains_as_a_model_built_during_fit_does(monkeypatch):
    """make_model creates the optimizer's and metrics' variables itself: Keras, left to create them
    inside the first trace, makes TensorFlow trace the training step twice. The weights after a
    step are the same either way."""
    from steps.datasets.batches import training_batches

    hp = dataclasses.replace(HP, image_size=16, stem_filters=4, filters=(8,), dense_units=0)  # seconds to trace
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 1)).astype("uint8")
    labels = (np.arange(10) % 2).astype("float32")

    def trained(build: bool) -> tuple[int, list[np.ndarray]]:
        if not build:  # as Keras does by itself: the variables made in the first trace
            monkeypatch.setattr(model_module.keras.Model, "_symbolic_build", lambda self, **kwargs: None)
        set_seed(0)
        model = make_model(hp, seed=0)
        monkeypatch.undo()
        traces, step = [], model.train_step
        model.train_step = lambda data: traces.append(1) or step(data)  # runs only while tracing
        batches, steps = training_batches(images, labels, 4, 0, "none")
        model.fit(batches, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
        return len(traces), model.get_weights()

    (once, built), (twice, unbuilt) = trained(build=True), trained(build=False)
    assert (once, twice) == (1, 2)
    for a, b in zip(built, unbuilt, strict=True):
        np.testing.assert_array_equal(a, b)


def as_learning_test(hp: HParams) -> HParams:
    """A set as the learning test trains it: without dropout, regularisation or warm-up, at 32x32 for
    the networks trained from scratch and 64x64 for a pretrained one (its stride-32 features need it)."""
    size = 32 if hp.arch == "cnn" else 64
    return dataclasses.replace(hp, dropout=0.0, weight_decay=0.0, label_smoothing=0.0, epochs=15, warmup_epochs=0,
                               image_size=size, drop_connect=0.0)  # fmt: skip


def distinct_learning_tests() -> dict[str, HParams]:
    """Every set of conf/hparams.yaml, once per network the learning test would train: sets that only
    differ in what it turns off (lite128 and lite160 only in their image size) share one case."""
    cases: dict[HParams, list[str]] = {}
    for name, hp in sorted(load_config().hparam_sets.items()):
        # Augmentation and test-time views are not used by the learning test: not a difference.
        key = dataclasses.replace(as_learning_test(hp), augment="none", tta="none")
        cases.setdefault(key, []).append(name)
    return {"+".join(names): hp for hp, names in cases.items()}


@pytest.mark.parametrize(
    "names",
    # A pretrained network's case takes over ten seconds: slow, left out of `make test-fast`.
    [
        pytest.param(n, marks=[pytest.mark.slow] * (hp.arch != "cnn"))
        for n, hp in sorted(distinct_learning_tests().items())
    ],
)
def test_every_set_can_drive_training_loss_down_on_one_batch(tiny_data, names):
    """The network can learn: on one fixed batch of real cells, without dropout, regularisation or
    augmentation, the training loss falls to a small part of where it started."""
    hp = distinct_learning_tests()[names]
    size = hp.image_size
    samples = scan_split(tiny_data, "train", ("ok_front", "def_front"))[::3]  # both classes
    images, failures = load_images([s.path for s in samples], size, progress=False)
    labels = np.array([s.label for s in samples], "float32")
    assert failures == {} and 0 < labels.mean() < 1
    set_seed(0)
    model = make_model(hp, seed=0)
    # One step an epoch, so each epoch's loss is that step's loss on this batch, in training mode.
    fitted = model.fit(images, labels, batch_size=len(labels), epochs=15, shuffle=False, callbacks=[schedule(hp)],
                       verbose=0)  # fmt: skip
    losses = fitted.history["loss"]
    assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.07, (losses[0], losses[-1])


def test_the_learning_test_covers_every_set_once():
    covered = [name for names in distinct_learning_tests() for name in names.split("+")]
    assert sorted(covered) == sorted(load_config().hparam_sets)


def test_forward_flops_count_each_convolution_and_dense_layer():
    hp = dataclasses.replace(HP, stem_filters=8, stem_stride=4, filters=(16,), convs_per_stage=1, dense_units=4)
    model = make_model(hp, seed=0)
    stem = 2 * 8 * 8 * 8 * (4 * 4 * 1)  # 8x8 outputs, 8 channels, a 4x4 kernel over 1 channel
    conv = 2 * 8 * 8 * 16 * (3 * 3 * 8)
    dense = 2 * 16 * 4 + 2 * 4 * 1
    assert forward_flops(model) == stem + conv + dense


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_amx(tmp_path):
    plain, zen4, amx = tmp_path / "plain", tmp_path / "zen4", tmp_path / "amx"
    plain.write_text("processor : 0\nflags : fpu sse2 avx2 fma\n")
    zen4.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")  # native, but measured slower
    amx.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert not model_module._cpu_has_amx(plain)
    assert not model_module._cpu_has_amx(zen4)
    assert model_module._cpu_has_amx(amx)
    assert not model_module._cpu_has_amx(tmp_path / "missing")
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"  # asked for by name: as asked


def test_the_learning_rate_warms_up_then_decays_towards_zero():
    hp = dataclasses.replace(HP, learning_rate=0.01, warmup_epochs=2, epochs=10)
    rates = [learning_rate(hp, epoch) for epoch in range(10)]
    assert rates[:3] == pytest.approx([0.01 / 3, 0.02 / 3, 0.01])
    assert all(a > b for a, b in zip(rates[2:], rates[3:], strict=False))  # decays every epoch after
    assert 0 < rates[-1] < 0.001


@pytest.mark.slow  # 7 s on 2 cores: make test only
def test_test_time_augmentation_is_the_mean_over_the_views_and_loads_in_safe_mode(tmp_path):
    import keras

    from steps.network.explain import gradcam
    from steps.network.model import with_tta

    set_seed(0)
    network = make_model(HP, seed=0)
    raw = np.random.default_rng(0).uniform(0, 255, (2, 40, 40, 1)).astype("float32")
    x = resize(raw, 32)
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    for tta, expected in (("flips", views), ("dihedral", views + [v.transpose(0, 2, 1, 3) for v in views])):
        served = with_tta(network, dataclasses.replace(HP, tta=tta))
        want = np.mean([network.predict(v, verbose=0) for v in expected], axis=0)
        np.testing.assert_allclose(served.predict(raw, verbose=0), want, atol=1e-6)
    served.save(tmp_path / "served.keras")
    loaded = keras.saving.load_model(tmp_path / "served.keras", safe_mode=True, compile=False)
    np.testing.assert_array_equal(loaded.predict(raw, verbose=0), served.predict(raw, verbose=0))
    assert gradcam(loaded, raw[:1]).shape == (1, 40, 40)  # explains the network inside the views
    assert with_tta(network, HP) is network  # tta: none


def test_loss_and_accuracy_from_predictions_match_keras_evaluate():
    """fit_one computes the served model's validation loss and accuracy from its predictions instead
    of a second pass: the figures must be the ones Keras's evaluate reports. For a mean over views
    (test-time augmentation) Keras also has only probabilities, clipped at 1e-7, even saturated ones;
    for a bare sigmoid it uses the logits, the same figure while the probability is not saturated."""
    import keras

    from steps.network.scoring import keras_loss_and_accuracy

    rng = np.random.default_rng(3)
    x = rng.uniform(-3, 3, (40, 1)).astype("float32")
    y = (rng.uniform(size=40) > 0.5).astype("float32")
    inputs = keras.Input((1,))
    sigmoid = keras.Model(inputs, keras.layers.Activation("sigmoid")(inputs))
    views = [keras.layers.Activation("sigmoid")(keras.layers.Rescaling(k)(inputs)) for k in (1.0, 20.0)]
    mean_of_views = keras.Model(inputs, keras.layers.Average()(views))
    saturated = x.copy()
    saturated[:4, 0] = 30.0  # probabilities of 1.0 in float32, some of them on good cells
    for model, data in ((sigmoid, x), (mean_of_views, saturated)):
        for smoothing in (0.0, 0.1):
            model.compile(loss=keras.losses.BinaryCrossentropy(label_smoothing=smoothing), metrics=["accuracy"])
            expected = model.evaluate(data, y, batch_size=16, verbose=0)
            got = keras_loss_and_accuracy(y, model.predict(data, verbose=0).reshape(-1), smoothing)
            np.testing.assert_allclose(got, expected, rtol=1e-5)


def every_layer(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from every_layer(layer)


@pytest.mark.parametrize("name", ["small", pytest.param("lite160", marks=pytest.mark.slow)])
def test_a_network_trained_in_mixed_precision_is_scored_logged_and_exported_in_float32(name):
    """On a CPU with AMX, precision auto trains in mixed_bfloat16; the ONNX converter refuses a
    bfloat16 graph, and a bfloat16 Keras model would not score as its float32 exports do."""
    import keras

    hp = dataclasses.replace(load_config().hparam_sets[name], image_size=32)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = make_model(hp, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    copy = model_module.float32_copy(mixed)
    assert mixed.dtype_policy.name == "mixed_bfloat16"
    assert {layer.dtype_policy.name for layer in every_layer(copy)} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(mixed.get_weights(), copy.get_weights(), strict=True))
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    assert np.allclose(mixed.predict(images, verbose=0), copy.predict(images, verbose=0), atol=0.05)
    assert model_module.float32_copy(copy) is copy


@pytest.mark.slow  # two trainings, 13 s: make test only
def test_an_average_of_the_weights_is_what_validation_scores_and_fit_returns():
    """With ``ema`` the optimiser keeps an average of the weights: training follows the same steps,
    validation scores the average, and the network returned is the best epoch's average."""
    import keras

    from steps.network.scoring import keras_loss_and_accuracy
    from steps.network.training import fit

    rng = np.random.default_rng(0)
    x, xv = (rng.uniform(0, 200, (n, 32, 32, 1)).astype("float32") for n in (64, 32))
    y, yv = ((rng.uniform(size=n) > 0.5).astype("float32") for n in (64, 32))
    x[y == 1] += 50
    xv[yv == 1] += 50

    class History(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.logs = []

        def on_epoch_end(self, epoch, logs=None):
            self.logs.append(dict(logs))

    runs = {}
    for ema in (0.0, 0.8):
        history = History()
        hp = dataclasses.replace(HP, epochs=4, patience=0, ema=ema)
        network, best_epoch, _ = fit(hp, 0, "float32", (x, y), (xv, yv), 16, callbacks=[history])
        runs[ema] = history.logs, network, best_epoch
    (plain, _, _), (averaged, network, best_epoch) = runs[0.0], runs[0.8]
    np.testing.assert_allclose([e["loss"] for e in averaged], [e["loss"] for e in plain], rtol=1e-5)
    assert not np.allclose([e["val_loss"] for e in averaged], [e["val_loss"] for e in plain], rtol=1e-4)
    val_loss, _ = keras_loss_and_accuracy(yv, network.predict(xv, verbose=0).reshape(-1), 0.0)
    assert val_loss == pytest.approx(averaged[best_epoch - 1]["val_loss"], rel=1e-4)


@pytest.mark.slow  # three epochs, two traces of the step: make test only
def test_progressive_resolution_trains_the_first_epochs_smaller_and_validates_at_full_size(monkeypatch):
    """``start_size``: the training step is traced at the small size for the first ``start_epochs`` epochs and
    again at ``image_size`` after; the test step, and the network returned, are at ``image_size`` throughout."""
    from steps.network import training

    seen: list[tuple[str, int]] = []  # (the step being traced, the size the resize layer gave it)
    phase = [""]

    def recording_model(hp, seed):
        model = make_model(hp, seed)
        layer = model.get_layer("resize")
        call = layer.call

        def resized(*args, **kwargs):  # runs only while a step is traced
            out = call(*args, **kwargs)
            seen.append((phase[0], int(out.shape[1])))
            return out

        layer.call = resized
        for name in ("train_step", "test_step"):
            step = getattr(model, name)
            setattr(model, name, lambda data, step=step, name=name: phase.__setitem__(0, name) or step(data))
        return model

    monkeypatch.setattr(training, "make_model", recording_model)
    rng = np.random.default_rng(0)
    x, xv = (rng.integers(0, 256, (n, 32, 32, 1)).astype("float32") for n in (16, 8))
    y, yv = ((np.arange(n) % 2).astype("float32") for n in (16, 8))
    hp = dataclasses.replace(HP, image_size=32, stem_filters=4, filters=(8,), epochs=3, patience=0, start_size=16,
                             start_epochs=2)  # fmt: skip
    network, _, epochs_run = training.fit(hp, 0, "float32", (x, y), (xv, yv), 8)
    assert epochs_run == 3
    assert seen == [("train_step", 16), ("test_step", 32), ("train_step", 32)]
    assert network.get_layer("resize").height == network.get_layer("resize").width == 32
    assert network.predict(xv, verbose=0).shape == (8, 1)


@pytest.mark.slow  # 30 epochs; the term's formula is unit-tested (tests/unit/test_losses.py)
def test_a_set_with_a_ranking_term_compiles_with_it_and_learns_one_batch():
    from steps.network.model import RankedCrossentropy

    hp = dataclasses.replace(HP, image_size=16, stem_filters=4, filters=(8,), dropout=0.0, warmup_epochs=0,
                             rank_weight=1.0)  # fmt: skip
    set_seed(0)
    model = make_model(hp, seed=0)
    assert isinstance(model.loss, RankedCrossentropy) and model.loss.rank_weight == 1.0
    x = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1)).astype("float32")
    y = (np.arange(8) % 2).astype("float32")
    x[y == 1] += 40
    losses = model.fit(x, y, batch_size=8, epochs=30, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0]
