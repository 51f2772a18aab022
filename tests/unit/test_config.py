"""Unit: configuration loading, overrides and the clear errors for bad values."""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest
import yaml

from helpers import PROJECT_DIR, empty_store
from steps import main
from steps.core import cli, contract, parameters, signals
from steps.core.config import CONF_DIR, ConfigError
from steps.core.loader import load_config

pytestmark = pytest.mark.unit


def test_default_config_has_three_pretrained_sets_and_the_contract_defaults():
    config = load_config()
    assert len(config.train.hparams) == 3
    assert {hp.arch for hp in config.selected_hparams().values()} == {"efficientnet_lite0"}
    assert config.hparam_sets["small"].arch == "cnn"  # the networks trained from scratch stay available
    assert config.evaluate.threshold == 0.60
    assert config.evaluate.min_improvement == 0.0  # any gain promotes; a tie keeps the champion
    assert config.registry.production == "Production_Reg"
    assert config.registry.testing == "Testing_Reg"
    assert config.infer_model_uri == "models:/Production_Reg@prod"
    assert config.infer_input == "data/test"
    assert config.data.classes == ("ok_front", "def_front")


def test_overrides_are_parsed_into_their_types():
    config = load_config({"train.epochs": "3", "train.hparams": "small,wide", "evaluate.threshold": "0.75"})
    assert {name: hp.epochs for name, hp in config.selected_hparams().items()} == {"small": 3, "wide": 3}
    assert config.evaluate.threshold == 0.75
    assert config.train.epochs == 3


def test_epochs_and_image_size_null_keep_each_sets_own():
    config = load_config()
    for key in ("epochs", "image_size"):
        assert [getattr(hp, key) for hp in config.selected_hparams().values()] == [
            getattr(config.hparam_sets[name], key) for name in config.train.hparams
        ]
    resized = load_config({"train.image_size": "64"})
    assert {hp.image_size for hp in resized.selected_hparams().values()} == {64}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epochs": "abc"}, "train.epochs: expected an integer, got 'abc'"),
        ({"train.epochs": "0"}, "train.epochs: expected an integer >= 1, got 0"),
        ({"train.image_size": "1.5"}, "train.image_size: expected an integer, got '1.5'"),
        ({"train.image_size": "8"}, "train.image_size: expected an integer in [16, 1024], got 8"),
        ({"train.hparams": "small,huge"}, "train.hparams: unknown hyperparameter set 'huge'"),
        ({"evaluate.threshold": "1.5"}, "evaluate.threshold: expected a number in [0, 1], got 1.5"),
        ({"evaluate.threshold": "1.01"}, "evaluate.threshold: expected a number in [0, 1], got 1.01"),
        ({"evaluate.threshold": "-0.1"}, "evaluate.threshold: expected a number in [0, 1], got -0.1"),
        ({"evaluate.threshold": "high"}, "evaluate.threshold: expected a number, got 'high'"),
        ({"seed": "-1"}, "seed: expected an integer in [0, 2**32), got -1"),
        (
            {"train.epoch": "3"},
            "train.epoch: unknown key; expected one of deterministic, epochs, exports, hparams, image_size, prec",
        ),
        (
            {"train.precision": "float16"},
            "train.precision: expected one of auto, float32, mixed_bfloat16, mixed_float16, got 'float16'",
        ),
        ({"train.deterministic": "yes"}, "train.deterministic: expected true or false, got 'yes'"),
        ({"evaluate.min_improvement": "-0.01"}, "evaluate.min_improvement: expected a number in [0, 1), got -0.01"),
        ({"evaluate.min_improvement": "1"}, "evaluate.min_improvement: expected a number in [0, 1), got 1.0"),
        (
            {"train.threshold_objective": "recall"},
            "train.threshold_objective: expected one of accuracy, balanced_accuracy, f1, or min_recall:R, "
            "min_precision:P or max_false_alarm:F with R, P, F in (0, 1], got 'recall'",
        ),
        ({"infer.model_uri": "Production_Reg"}, "infer.model_uri: expected models:/<name>/<version> or"),
        ({"experiment": "a/b"}, "experiment: expected a name without '/'"),
    ],
)
def test_bad_values_are_rejected_with_the_key_and_the_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert message in str(err.value)


@pytest.fixture
def conf_copy(tmp_path):
    target = tmp_path / "conf"
    shutil.copytree(CONF_DIR, target)
    return target


def test_unknown_key_in_a_conf_file_is_rejected(conf_copy):
    path = conf_copy / "pipeline.yaml"
    path.write_text(path.read_text().replace("  val_fraction:", "  val_fractoin:"))
    with pytest.raises(ConfigError, match=r"data.val_fractoin: unknown key; expected one of .*val_fraction"):
        load_config(conf_dir=conf_copy)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning_rate", "fast", "hparams.yaml: small.learning_rate: expected a number, got 'fast'"),
        ("dropout", 1.5, "hparams.yaml: small.dropout: expected a number in [0, 1), got 1.5"),
        ("augment", "rotate", "hparams.yaml: small.augment: expected one of none, flips, dihedral, got 'rotate'"),
        ("stem_stride", 0, "hparams.yaml: small.stem_stride: expected an integer in [1, 8], got 0"),
        ("label_smoothing", 0.5, "hparams.yaml: small.label_smoothing: expected a number in [0, 0.5), got 0.5"),
        ("patience", -1, "hparams.yaml: small.patience: expected an integer >= 0, got -1"),
        ("filters", [], "hparams.yaml: small.filters: expected one or more positive integers (arch cnn), got ()"),
        (
            "arch",
            "resnet",
            "hparams.yaml: small.arch: expected one of cnn, efficientnet_lite0, efficientnet_lite1, got 'resnet'",
        ),
        ("image_size", 8, "hparams.yaml: small.image_size: expected an integer in [16, 1024], got 8"),
        ("freeze_blocks", 17, "hparams.yaml: small.freeze_blocks: expected an integer in [-1, 16], got 17"),
        ("ema", 1.0, "hparams.yaml: small.ema: expected a number in [0, 1), got 1.0"),
        ("soft_weight", 1.5, "hparams.yaml: small.soft_weight: expected a number in [0, 1], got 1.5"),
        ("rank_weight", -1.0, "hparams.yaml: small.rank_weight: expected a number in [0, 100], got -1.0"),
        ("start_size", 128, "hparams.yaml: small.start_size: expected 0 (off) or an integer in [16, image_size 128)"),
        ("start_epochs", 2, "hparams.yaml: small.start_epochs: expected 0 without start_size, got 2"),
        ("warmup", 2, "hparams.yaml: small.warmup: unknown key; expected one of arch, augment, batch_size,"),
    ],
)
def test_bad_value_in_a_hparam_set_names_the_set_and_the_key(conf_copy, key, value, message):
    path = conf_copy / "hparams.yaml"
    sets = yaml.safe_load(path.read_text())
    sets["small"][key] = value
    path.write_text(yaml.safe_dump(sets))
    with pytest.raises(ConfigError) as err:
        load_config(conf_dir=conf_copy)
    assert str(err.value).startswith(message)


def test_progressive_resolution_must_leave_epochs_at_full_size(conf_copy):
    path = conf_copy / "hparams.yaml"
    sets = yaml.safe_load(path.read_text())
    sets["small"] |= {"start_size": 64, "start_epochs": sets["small"]["epochs"]}
    path.write_text(yaml.safe_dump(sets))
    message = "small.start_epochs: expected an integer in [1, epochs 30), got 30"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(conf_dir=conf_copy)


def test_cli_rejects_a_bad_parameter_before_the_step_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    called = []
    with pytest.raises(SystemExit) as exit_info:
        cli.main(lambda config: called.append(config), "test", {"epochs": "train.epochs"}, argv=["--epochs", "abc"])
    assert exit_info.value.code == 2
    assert called == []
    assert capsys.readouterr().err.strip() == "error: parameter epochs (train.epochs): expected an integer, got 'abc'"
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_cli_handles_sigterm_only_while_its_stage_runs(tmp_path, monkeypatch, capsys):
    """The stage's SIGTERM handler goes when the stage ends: a process that ran a stage in-process (a
    pool worker, a test) must die of SIGTERM again, even if stuck in C code where no Python handler runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", empty_store(tmp_path / "mlflow.db"))
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    assert (
        cli.main(lambda config: seen.append(signal.getsignal(signal.SIGTERM)) or "done", "test", {}, argv=[]) == "done"
    )
    assert seen == [signals._on_signal]
    assert signal.getsignal(signal.SIGTERM) is before

    def stopped(config):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, in the step
        pytest.fail("SIGTERM did not stop the step")

    with pytest.raises(SystemExit) as exit_info:
        cli.main(stopped, "test", {}, argv=[])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert (
        capsys.readouterr().err.strip().endswith("error: stopped by SIGTERM; any run it had started is marked KILLED")
    )
    assert signal.getsignal(signal.SIGTERM) is before
    assert signals.received() is signal.SIGTERM
    cli.main(lambda config: None, "test", {}, argv=[])  # a later stage in this process starts afresh
    assert signals.received() is None


def test_cli_empty_parameter_keeps_the_conf_value():
    config, own = cli.parse(
        "test", {"epochs": "train.epochs", "seed": "seed"}, ["--epochs", "", "--seed", "7"], own=("run_id",)
    )
    assert config.train.epochs is None
    assert config.seed == 7
    assert own == {"run_id": ""}


def test_main_rejects_an_unknown_env_manager_before_any_stage(store):
    import mlflow

    from steps.core.errors import PipelineError
    from steps.main import main

    with pytest.raises(PipelineError, match="env_manager: expected one of local, uv, virtualenv, conda, got 'docker'"):
        main(load_config(), env_manager="docker")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []  # no run was started


def test_mlproject_is_the_one_written_from_the_parameter_table():
    """steps.core.parameters is the one home of every entry point's parameters; MLproject is written from it."""
    assert (PROJECT_DIR / "MLproject").read_text() == parameters.mlproject_text(), "run make mlproject"


def test_the_written_mlproject_declares_each_parameter_typed_and_passes_it_to_its_step():
    project = yaml.safe_load(parameters.mlproject_text())["entry_points"]
    assert set(project) == set(parameters.PARAMS)
    for entry, params in parameters.PARAMS.items():
        declared = project[entry]["parameters"]
        assert list(declared) == [p.name for p in params], entry
        for p in params:
            spec = declared[p.name]
            assert spec["type"] == p.type, (entry, p.name)
            assert ("default" not in spec) == p.required, (entry, p.name)
            if not p.required:  # empty keeps conf/; only main's env_manager has a value of its own
                assert spec["default"] == ("local" if p.name == "env_manager" else ""), (entry, p.name)
        command = " ".join(project[entry]["command"].split())
        assert command.startswith(f"python -m steps.{entry} ")
        assert re.findall(r"--(\w+)=\{(\w+)\}", command) == [(p.name, p.name) for p in params], entry


def test_main_passes_each_stage_every_value_it_resolved():
    config = load_config({"train.epochs": "3", "evaluate.threshold": "0.7", "infer.gradcam_top": "2"})
    passed = main.stage_parameters(config)
    assert passed[contract.STAGE_TRAIN]["epochs"] == "3" and "image_size" not in passed[contract.STAGE_TRAIN]
    assert passed[contract.STAGE_TRAIN]["hparams"] == ",".join(config.train.hparams)
    assert passed[contract.STAGE_EVAL]["threshold"] == "0.7"
    assert passed[contract.STAGE_INFER]["model_uri"] == "models:/Production_Reg@prod"
    assert passed[contract.STAGE_INFER]["gradcam_top"] == "2"
    for stage, entry in main.ENTRY_POINTS.items():  # only parameters the stage declares
        assert set(passed[stage]) <= set(parameters.overrides(entry)), stage


def test_the_readme_is_a_front_page_and_leaves_the_parameters_to_mlproject():
    """The README stays a front page (reference material goes to docs/), and points to MLproject,
    where each entry point's parameters are declared with a comment each, instead of listing them."""
    readme = (PROJECT_DIR / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    assert "[`MLproject`](MLproject)" in readme
    for entry, params in parameters.PARAMS.items():
        declared = parameters.mlproject_text().split(f"\n  {entry}:\n", 1)[1].split("command:", 1)[0]
        assert all(f"      {p.name}:" in declared for p in params), entry
    for page in re.findall(r"\]\((docs/[\w.-]+\.md)\)", readme):  # every page it links exists
        assert (PROJECT_DIR / page).is_file(), page
