"""Typed configuration: dataclasses loaded from ``conf/*.yaml``, with ``-P`` overrides.

``conf/pipeline.yaml`` holds the pipeline settings and ``conf/hparams.yaml`` the named
hyperparameter sets. An override is a dotted key and a string (as ``mlflow run -P`` passes it):
``{"train.epochs": "3"}``. Unknown keys, wrong types and out-of-range values raise
``ConfigError`` naming the key, what it expected and what it got, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.network.pretrained import BLOCKS
from steps.network.scoring import parse_target
from steps.served.serving import EXPORTS, RUNTIMES

PROJECT_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_DIR / "conf"


MODEL_URI = re.compile(r"models:/([^/@:]+)(/[0-9]+|@[\w-]+)")
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run ID
RUN_URI = re.compile(rf"runs:/{RUN_ID.pattern}/[\w./-]+")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range: ``key`` (dotted, or a
    file) and what is wrong with it; the message is ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


AUGMENTATIONS = ("none", "flips", "dihedral")
# The networks make_model builds: each name's ``<name>_features`` in steps.network.model builds it.
ARCHS = ("cnn", *BLOCKS)
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# The exports train can make of each model: the table of steps.served.serving.EXPORTS.
EXPORT_FORMATS = tuple(EXPORTS)


@dataclass(frozen=True)
class HParams:
    """One hyperparameter set of ``conf/hparams.yaml`` (the network, its optimiser and schedule)."""

    learning_rate: float
    batch_size: int
    epochs: int
    # The network: one of ARCHS ("cnn": trained from scratch; "efficientnet_lite0" or "efficientnet_lite1":
    # an ImageNet-trained EfficientNet-Lite, fine-tuned) and the size images are resized to.
    arch: str = "cnn"
    image_size: int = 128
    # cnn: 3x3 stages of these widths, after a patchify stem (a stem_stride x stem_stride
    # convolution with that stride and stem_filters outputs; 0 filters: no stem).
    filters: tuple[int, ...] = ()
    dense_units: int = 0
    dropout: float = 0.0
    stem_filters: int = 0
    stem_stride: int = 1
    convs_per_stage: int = 1
    # efficientnet_lite*: the stem and this many of its blocks (Lite0 16, Lite1 21) keep their ImageNet weights
    # (no gradient through them; -1: nothing frozen, the stem trains too); the stochastic-depth rate.
    freeze_blocks: int = 0
    drop_connect: float = 0.0
    weight_decay: float = 0.0
    # Linear warm-up to learning_rate over these epochs, then cosine decay to zero.
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    # none; flips (left-right, up-down); dihedral (flips and transposes: all 8 symmetries of a square).
    augment: str = "flips"
    # Test-time augmentation in the logged model: the mean prediction over those views of each image
    # (none, flips: 4 views, dihedral: 8), at that many times the cost of scoring an image.
    tta: str = "none"
    # Stop when validation accuracy has not improved for this many epochs and keep the best epoch's
    # weights (0: train every epoch, keep the best epoch's weights all the same).
    patience: int = 0
    # Train on the experts' defect probability where the data's manifest.csv has one per image
    # (ELPV: 0, 1/3, 2/3, 1) instead of the 0/1 folder label; the folder labels where it has none.
    # Validation, the cut-off and every score still use the folder labels.
    soft_labels: bool = False
    # With soft_labels: how much of the target is the experts' probability, the rest the folder label (1: the
    # probability alone; 0.3 puts the cells they gave 1/3 at 0.1 and those they gave 2/3 at 0.9).
    soft_weight: float = 1.0
    # The momentum of an average of the weights kept at every step (0: none). Validation scores the
    # average, so the best epoch and the logged model are the average's; 0.99 averages about the
    # last 100 steps.
    ema: float = 0.0
    # Progressive resolution: the first start_epochs epochs train at start_size px, cheaper steps while the
    # head settles; the rest, validation and the logged model at image_size (0: every epoch at image_size).
    start_size: int = 0
    start_epochs: int = 0
    # A pairwise ranking term added to the cross-entropy with this weight (0: none): it scores the order of
    # the defect probabilities, which precision at a high recall depends on (steps.network.model).
    rank_weight: float = 0.0

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, "arch", f"one of {', '.join(ARCHS)}", self.arch)
        _check(16 <= self.image_size <= 1024, "image_size", "an integer in [16, 1024]", self.image_size)
        _check(
            self.arch != "cnn" or (len(self.filters) >= 1 and min(self.filters) >= 1),
            "filters",
            "one or more positive integers (arch cnn)",
            self.filters,
        )
        blocks = BLOCKS.get(self.arch, 16)
        _check(-1 <= self.freeze_blocks <= blocks, "freeze_blocks", f"an integer in [-1, {blocks}]", self.freeze_blocks)
        _check(0.0 <= self.drop_connect < 1.0, "drop_connect", "a number in [0, 1)", self.drop_connect)
        _check(self.dense_units >= 0, "dense_units", "an integer >= 0", self.dense_units)
        _check(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)", self.dropout)
        _check(0.0 < self.learning_rate < 1.0, "learning_rate", "a number in (0, 1)", self.learning_rate)
        _check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        _check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        _check(self.stem_filters >= 0, "stem_filters", "an integer >= 0", self.stem_filters)
        _check(1 <= self.stem_stride <= 8, "stem_stride", "an integer in [1, 8]", self.stem_stride)
        _check(self.convs_per_stage >= 1, "convs_per_stage", "an integer >= 1", self.convs_per_stage)
        _check(0.0 <= self.weight_decay < 1.0, "weight_decay", "a number in [0, 1)", self.weight_decay)
        _check(self.warmup_epochs >= 0, "warmup_epochs", "an integer >= 0", self.warmup_epochs)
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing", "a number in [0, 0.5)", self.label_smoothing)
        _check(self.augment in AUGMENTATIONS, "augment", f"one of {', '.join(AUGMENTATIONS)}", self.augment)
        _check(self.tta in AUGMENTATIONS, "tta", f"one of {', '.join(AUGMENTATIONS)}", self.tta)
        _check(self.patience >= 0, "patience", "an integer >= 0", self.patience)
        _check(0.0 <= self.ema < 1.0, "ema", "a number in [0, 1)", self.ema)
        _check(0.0 <= self.soft_weight <= 1.0, "soft_weight", "a number in [0, 1]", self.soft_weight)
        _check(0.0 <= self.rank_weight <= 100.0, "rank_weight", "a number in [0, 100]", self.rank_weight)
        _check(
            self.start_size == 0 or 16 <= self.start_size < self.image_size,
            "start_size",
            f"0 (off) or an integer in [16, image_size {self.image_size})",
            self.start_size,
        )
        if self.start_size:
            expected = f"an integer in [1, epochs {self.epochs})"
            _check(1 <= self.start_epochs < self.epochs, "start_epochs", expected, self.start_epochs)
        else:
            _check(self.start_epochs == 0, "start_epochs", "0 without start_size", self.start_epochs)


@dataclass(frozen=True)
class DataConfig:
    dir: str
    defect_class: str
    good_class: str
    val_fraction: float
    # Fill an empty default data directory from the installed elpv-dataset package.
    bootstrap_elpv: bool
    # Leave out images that cannot be decoded (counted, logged) instead of failing the stage.
    skip_bad_images: bool = False
    # Keep each split's decoded, resized images on disk, keyed by the files' contents and the size,
    # so a rerun decodes nothing (steps.datasets.data.load_images; where: steps.datasets.data.cache_dir).
    cache: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.dir), "data.dir", "a directory", self.dir)
        _check(
            self.defect_class != self.good_class,
            "data.good_class",
            "a name other than data.defect_class",
            self.good_class,
        )
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", "a number in (0, 1)", self.val_fraction)

    @property
    def classes(self) -> tuple[str, str]:
        """Class folder names by label: index 0 is good, index 1 is defect (the positive class)."""
        return (self.good_class, self.defect_class)


@dataclass(frozen=True)
class TrainConfig:
    hparams: tuple[str, ...]
    # None: each hyperparameter set's own image_size and epochs; an integer overrides them all.
    image_size: int | None = None
    epochs: int | None = None
    # What the decision threshold on the defect probability is tuned for, on the validation split.
    threshold_objective: str = "balanced_accuracy"
    # auto: mixed precision only where the hardware computes in it natively (a GPU: mixed_float16;
    # a CPU with AMX: mixed_bfloat16), else float32. See steps.network.model.resolve_precision.
    precision: str = "auto"
    # true: TensorFlow's deterministic ops, so one seed gives the same metrics on every rerun.
    deterministic: bool = False
    # Which exports to log with each model, of EXPORT_FORMATS; ("none",): none.
    exports: tuple[str, ...] = EXPORT_FORMATS
    # Training processes on this machine (steps.network.distributed): 1 trains as always; N > 1 starts
    # N - 1 more on 127.0.0.1. On several machines, TF_CONFIG names the cluster instead.
    workers: int = 1
    # Seconds any worker may wait for the others (at start, at a step, between sets) before the run fails.
    worker_timeout: float = 600.0

    @property
    def export_formats(self) -> tuple[str, ...]:
        return () if self.exports == ("none",) else self.exports

    def __post_init__(self) -> None:
        _check(len(self.hparams) >= 1, "train.hparams", "one or more hyperparameter set names", self.hparams)
        _check(
            self.image_size is None or 16 <= self.image_size <= 1024,
            "train.image_size",
            "an integer in [16, 1024]",
            self.image_size,
        )
        _check(self.epochs is None or self.epochs >= 1, "train.epochs", "an integer >= 1", self.epochs)
        try:
            parse_target(self.threshold_objective)
        except ValueError as err:
            raise ConfigError("train.threshold_objective", str(err)) from None
        _check(1 <= self.workers <= 64, "train.workers", "an integer in [1, 64]", self.workers)
        _check(self.worker_timeout > 0, "train.worker_timeout", "a number of seconds > 0", self.worker_timeout)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        _check(
            self.exports == ("none",)
            or (len(set(self.exports)) == len(self.exports) and set(self.exports) <= set(EXPORT_FORMATS)),
            "train.exports",
            f"a comma-separated list of {', '.join(EXPORT_FORMATS)}, or none",
            ",".join(self.exports),
        )


# How evaluate decides who holds prod (evaluate.promotion).
SIGNIFICANT = "significant"
PROMOTIONS = ("highest", SIGNIFICANT)


@dataclass(frozen=True)
class EvaluateConfig:
    threshold: float
    batch_size: int
    # A challenger takes prod only if it beats the champion's accuracy (same test set) by this much.
    min_improvement: float = 0.0
    # false: register and score, but never move prod; the version is marked ineligible for it.
    promote: bool = True
    # highest: the highest acc on the test set takes prod (by min_improvement); significant: a new
    # version takes prod only when it beats the holder on the same images at McNemar p < 0.05.
    promotion: str = "highest"

    def __post_init__(self) -> None:
        _check(0.0 <= self.threshold <= 1.0, "evaluate.threshold", "a number in [0, 1]", self.threshold)
        _check(
            0.0 <= self.min_improvement < 1.0, "evaluate.min_improvement", "a number in [0, 1)", self.min_improvement
        )
        _check(self.batch_size >= 1, "evaluate.batch_size", "an integer >= 1", self.batch_size)
        _check(self.promotion in PROMOTIONS, "evaluate.promotion", f"one of {', '.join(PROMOTIONS)}", self.promotion)


# infer's output file: its suffix says the format.
OUTPUT_FORMATS = (".csv", ".jsonl")
ENGINES = ("local", "spark")
# What infer does with the drift check: report it (log, tag, metrics, figure), also fail the stage on an
# alert, or skip it.
DRIFT_MODES = ("report", "fail", "off")


@dataclass(frozen=True)
class InferConfig:
    output: str
    batch_size: int
    # None: "<data.dir>/test" and "models:/<registry.production>@<registry.alias>" (Config.infer_*).
    input: str | None = None
    model_uri: str | None = None
    engine: str = "local"
    spark_master: str = "local[*]"
    allow_errors: bool = False
    gradcam_top: int = 8
    runtime: str = "keras"
    max_file_mb: int = 256
    drift: str = "report"
    review_top: int = 16
    review_dir: str | None = None

    def __post_init__(self) -> None:
        _check(
            Path(self.output).suffix.lower() in OUTPUT_FORMATS,
            "infer.output",
            f"a file path ending in {' or '.join(OUTPUT_FORMATS)} (CSV or JSON Lines)",
            self.output,
        )
        _check(self.batch_size >= 1, "infer.batch_size", "an integer >= 1", self.batch_size)
        _check(self.engine in ENGINES, "infer.engine", f"one of {', '.join(ENGINES)}", self.engine)
        _check(bool(self.spark_master), "infer.spark_master", "a Spark master URL such as local[*]", self.spark_master)
        _check(self.gradcam_top >= 0, "infer.gradcam_top", "an integer >= 0", self.gradcam_top)
        _check(self.runtime in RUNTIMES, "infer.runtime", f"one of {', '.join(RUNTIMES)}", self.runtime)
        _check(self.max_file_mb >= 1, "infer.max_file_mb", "an integer >= 1 (megabytes)", self.max_file_mb)
        _check(self.drift in DRIFT_MODES, "infer.drift", f"one of {', '.join(DRIFT_MODES)}", self.drift)
        _check(self.review_top >= 0, "infer.review_top", "an integer >= 0", self.review_top)


@dataclass(frozen=True)
class ServeConfig:
    """The scoring front (``steps.served.front``): where it listens and the bounds it puts on every request."""

    host: str = "127.0.0.1"
    port: int = 5001
    max_body_mb: int = 64
    max_images: int = 64
    max_json_depth: int = 16
    max_concurrent: int = 2
    max_admitted: int = 8
    poll_seconds: float = 10.0

    def __post_init__(self) -> None:
        _check(1 <= self.port <= 65535, "serve.port", "a port number in [1, 65535]", self.port)
        for key in ("max_body_mb", "max_images", "max_json_depth", "max_concurrent"):
            _check(getattr(self, key) >= 1, f"serve.{key}", "an integer >= 1", getattr(self, key))
        _check(
            self.max_admitted >= self.max_concurrent,
            "serve.max_admitted",
            f"an integer >= serve.max_concurrent ({self.max_concurrent})",
            self.max_admitted,
        )
        _check(self.poll_seconds > 0, "serve.poll_seconds", "a number of seconds > 0", self.poll_seconds)


@dataclass(frozen=True)
class StoreConfig:
    """A store kept between runs (``steps.mlflow_io.store``, CI's self-hosted runner): retention and backups."""

    keep_versions: int = 10
    keep_backups: int = 5

    def __post_init__(self) -> None:
        for key in ("keep_versions", "keep_backups"):
            _check(getattr(self, key) >= 1, f"store.{key}", "an integer >= 1", getattr(self, key))


@dataclass(frozen=True)
class RegistryConfig:
    production: str
    testing: str
    alias: str

    def __post_init__(self) -> None:
        _check(
            self.production != self.testing, "registry.testing", "a name other than registry.production", self.testing
        )


@dataclass(frozen=True)
class Config:
    experiment: str
    seed: int
    data: DataConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    infer: InferConfig
    registry: RegistryConfig
    serve: ServeConfig = field(default_factory=ServeConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    hparam_sets: Mapping[str, HParams] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            bool(self.experiment) and "/" not in self.experiment, "experiment", "a name without '/'", self.experiment
        )
        _check(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        names = (self.registry.production, self.registry.testing)
        _check(
            self.infer.model_uri is None or _from_our_store(self.infer.model_uri, names),
            "infer.model_uri",
            f"models:/<name>/<version> or models:/<name>@<alias> with <name> one of {', '.join(names)}, "
            "or runs:/<run ID>/<path>",
            self.infer.model_uri,
        )
        unknown = [name for name in self.train.hparams if name not in self.hparam_sets]
        if unknown:
            raise ConfigError(
                "train.hparams",
                f"unknown hyperparameter set {', '.join(map(repr, unknown))}; "
                f"conf/hparams.yaml defines {', '.join(map(repr, self.hparam_sets))}",
            )

    def selected_hparams(self) -> dict[str, HParams]:
        """The hyperparameter sets to train, with the ``train.epochs`` and ``train.image_size`` overrides applied."""
        given = {"epochs": self.train.epochs, "image_size": self.train.image_size}
        changes: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
        return {name: dataclasses.replace(self.hparam_sets[name], **changes) for name in self.train.hparams}

    @property
    def infer_input(self) -> str:
        return self.infer.input or str(Path(self.data.dir) / "test")

    @property
    def infer_model_uri(self) -> str:
        return self.infer.model_uri or f"models:/{self.registry.production}@{self.registry.alias}"

    def as_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for logging the resolved configuration."""
        return _plain(dataclasses.asdict(self))


def _from_our_store(uri: str, names: tuple[str, ...]) -> bool:
    """A model in the configured store's registry (or one of its runs): never a path, a URL or another
    registry (``models://profile@host/...``), since loading a model file runs its loader."""
    model = MODEL_URI.fullmatch(uri)
    run = RUN_URI.fullmatch(uri) and ".." not in uri.split("/")  # no climbing out of the run's artifacts
    return bool(model and model.group(1) in names) or bool(run)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(key, f"expected {expected}, got {got!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
