"""Bad data, bad parameters and misuse, table by table: each case meets every entry point it reaches.

Every row asserts the exact outcome (the clear error, the skipped-and-counted file, or the per-row
error in infer) and then that the store is left consistent (``helpers.assert_store_consistent``):
no run left RUNNING, no registered version without a finished eval run, no alias on a missing
version. The stages are called as functions (parameters through ``cli.main``, as ``mlflow run``
passes them) on copies of one trained store and of the tiny real-image set.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import WORLD_EXPERIMENT as EXPERIMENT  # the world's runs are in it
from conftest import world_config
from helpers import BAD_FILES, assert_store_consistent, encode, real_png, use_copy_of, write_bad
from steps import evaluate, infer, main, promote, train
from steps.core import cli, contract
from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.datasets.data import DataError
from steps.inference import spark
from steps.mlflow_io.registry import alias_version
from steps.served import packaging
from steps.served.serving import ImageError, decode_gray

# --- The bad files (helpers.BAD_FILES) ------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("kind", BAD_FILES)
def test_the_decoder_refuses_each_bad_file_with_its_reason(kind, tiny_data, tmp_path):
    path = write_bad(kind, tmp_path, real_png(tiny_data))
    with pytest.raises(ImageError) as err:
        decode_gray(path)
    assert str(err.value).startswith(BAD_FILES[kind][1])


@pytest.mark.data
def test_a_bomb_past_pillows_own_limit_is_refused_too(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(encode(Image.new("1", (15000, 15000)), "PNG"))  # 225 MP: Pillow refuses before we look
    with pytest.raises(ImageError, match=r"a decompression bomb.*225000000 pixels"):
        decode_gray(path)


# --- A trained store and data to break ------------------------------------------------------


config_for = world_config  # the world's configuration, on this test's data


@pytest.fixture
def store_copy(prod_world, tmp_path, monkeypatch):
    """This test's own copy of conftest's prod_world store: (client, train run ID)."""
    db, parent = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    yield mlflow.MlflowClient(), parent
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """This test's own copy of the tiny data set, to break."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def snapshot(client) -> tuple[int, int]:
    """(runs, registered versions) in the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, max_results=10000)), len(client.search_model_versions(""))


# --- Table: each bad file x each entry point it reaches ----------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("entry", ["train", "evaluate", "infer"])
@pytest.mark.parametrize("kind", BAD_FILES)
def test_each_bad_file_meets_each_entry_point(kind, entry, store_copy, data, tmp_path):
    client, parent = store_copy
    before = snapshot(client)
    reason = BAD_FILES[kind][1]
    if entry == "infer":
        incoming = Path(shutil.copytree(data / "test", tmp_path / "incoming"))
        bad = write_bad(kind, incoming / "def_front", real_png(data))
        # allow_errors: the exit status is test_infer's; here, the row each file gets.
        config = config_for(data, tmp_path, **{"infer.input": str(incoming), "infer.allow_errors": "true"})
        run_id = infer.infer(config)
        rows = {Path(r["path"]): r for r in csv.DictReader(open(config.infer.output))}
        assert rows[bad]["error"].startswith(reason) and rows[bad]["predicted_class"] == ""
        assert sum(1 for r in rows.values() if r["error"]) == 1  # the rest of the batch was scored
        assert mlflow.get_run(run_id).data.metrics[contract.METRIC_N_ERRORS] == 1
        assert snapshot(client) == (before[0] + 1, before[1])
    else:
        split = "train" if entry == "train" else "test"
        bad = write_bad(kind, data / split / "ok_front", real_png(data))
        with pytest.raises(DataError) as err:
            if entry == "train":
                train.train(config_for(data, tmp_path))
            else:
                evaluate.evaluate(config_for(data, tmp_path), parent)
        message = str(err.value)
        assert message.startswith(f"{split}: 1 of ") and f"  {bad}: {reason}" in message
        assert "-P skip_bad_images=true" in message
        assert snapshot(client) == before  # refused before any run or version was written
    assert_store_consistent(client)


@pytest.mark.model
@pytest.mark.parametrize("entry", [pytest.param("train", marks=pytest.mark.slow), "evaluate"])  # train: 11 s
def test_skip_bad_images_leaves_them_out_counted_and_listed(entry, store_copy, data, tmp_path):
    client, parent = store_copy
    split = "train" if entry == "train" else "test"
    real = real_png(data)  # read once: the bad files written next sort first
    bad = [
        write_bad(kind, data / split / cls, real)
        for kind, cls in zip(BAD_FILES, ["def_front", "ok_front"] * 3, strict=True)
    ]
    config = config_for(data, tmp_path, **{"data.skip_bad_images": "true", "evaluate.threshold": "0.0"})
    run_id = train.train(config) if entry == "train" else evaluate.evaluate(config, parent)

    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[contract.METRIC_N_SKIPPED] == len(BAD_FILES)
    listed = list(
        csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/skipped_images.csv")))
    )
    reasons = {r["file"]: r["reason"] for r in listed}
    assert sorted(reasons) == sorted(path.relative_to(data).as_posix() for path in bad)
    for kind, path in zip(BAD_FILES, bad, strict=True):
        assert reasons[path.relative_to(data).as_posix()].startswith(BAD_FILES[kind][1])
    # The images used are exactly the good ones, and the class balance counts them.
    good = {p.name for p in (data / split).rglob("*.png") if not p.name.startswith("bad_")}
    manifests = ["train_manifest.csv", "val_manifest.csv"] if entry == "train" else ["test_manifest.csv"]
    used = [
        row for name in manifests
        for row in csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{name}")))
    ]  # fmt: skip
    assert {Path(r["file"]).name for r in used} == good
    counted = [v for k, v in run.data.metrics.items() if k.startswith(("n_train_", "n_val_", "n_test_"))]
    assert sum(counted) == len(good)
    assert_store_consistent(client)


# --- Table: bad data sets ---------------------------------------------------------------------


def _share_train_image_with_test(data: Path) -> str:
    source = sorted((data / "train" / "ok_front").glob("*.png"))[0]
    shutil.copy(source, data / "test" / "ok_front" / "copied_under_another_name.png")
    return (
        "1 image(s) in more than one split or class (the same bytes):\n  train: .* = test: .*copied_under_another_name"
    )


def _one_image_in_both_classes(data: Path) -> str:
    source = sorted((data / "train" / "ok_front").glob("*.png"))[0]
    shutil.copy(source, data / "train" / "def_front" / "relabelled.png")
    return "1 image(s) in more than one split or class (the same bytes):\n  train: .* = train: .*relabelled.png"


def _one_class_only(data: Path) -> str:
    for split in ("train", "test"):
        shutil.rmtree(data / split / "def_front")
    return "no class folder 'def_front' (found: ok_front); a data set needs both classes"


def _an_empty_class(data: Path) -> str:
    for split in ("train", "test"):
        for path in (data / split / "def_front").glob("*.png"):
            path.unlink()
    return "def_front: no images; expected one folder per class"


def _a_class_of_bad_images_only(data: Path) -> str:
    for split in ("train", "test"):
        for path in (data / split / "def_front").glob("*.png"):
            path.write_bytes(b"")
    return "class 'def_front' has no usable image: all"


BAD_DATA_SETS = {
    "shared_between_train_and_test": _share_train_image_with_test,
    "one_image_under_two_classes": _one_image_in_both_classes,
    "one_class_only": _one_class_only,
    "a_class_with_no_images": _an_empty_class,
    "a_class_whose_images_are_all_bad_even_with_skip": _a_class_of_bad_images_only,
}


@pytest.mark.model
@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("case", BAD_DATA_SETS)
def test_each_bad_data_set_is_refused_by_each_stage_that_reads_it(case, entry, store_copy, data, tmp_path):
    client, parent = store_copy
    before = snapshot(client)
    message = BAD_DATA_SETS[case](data)
    config = config_for(data, tmp_path, **{"data.skip_bad_images": "true"})
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        if entry == "train":
            train.train(config)
        else:
            evaluate.evaluate(config, parent)
    assert snapshot(client) == before
    assert_store_consistent(client)


# --- Table: bad parameters, through the command line, for every entry point ---------------------


def _killed_train_run(client, parent) -> str:
    run = client.create_run(client.get_run(parent).info.experiment_id)
    client.set_terminated(run.info.run_id, "KILLED")
    return run.info.run_id


MISSING = "/nonexistent/folder"
UNKNOWN_RUN = "0" * 32

# (entry point, arguments, the error line it must print); "{killed}" and "{tmp}" are filled in.
BAD_PARAMETERS = [
    (train, ["--epochs", "abc"], "parameter epochs (train.epochs): expected an integer, got 'abc'"),
    (train, ["--epochs", "0"], "parameter epochs (train.epochs): expected an integer >= 1, got 0"),
    (train, ["--image_size", "8"], "parameter image_size (train.image_size): expected an integer in [16, 1024], got 8"),
    (train, ["--seed", "-1"], "parameter seed (seed): expected an integer in [0, 2**32), got -1"),
    (train, ["--hparams", "small,huge"], "parameter hparams (train.hparams): unknown hyperparameter set 'huge'"),
    (train, ["--skip_bad_images", "maybe"], "parameter skip_bad_images (data.skip_bad_images): expected true or false"),
    (train, ["--data_dir", MISSING], f"data.dir (-P data_dir): {MISSING} is not a directory"),
    (train, ["--experiment", "a/b"], "parameter experiment (experiment): expected a name without '/', got 'a/b'"),
    (train, ["--exports", "tflite"], "parameter exports (train.exports): expected a comma-separated list of onnx, litert, or none, got 'tflite'"),
    (evaluate, ["--run_id", ""], "evaluate needs -P run_id=<train run ID>"),
    (evaluate, ["--run_id", "x"], "parameter run_id: expected a 32-character MLflow run ID (0-9, a-f), got 'x'"),
    (evaluate, ["--run_id", UNKNOWN_RUN], f"run '{UNKNOWN_RUN}' does not exist in sqlite:///"),
    (evaluate, ["--run_id", "{killed}"], "run {killed} is KILLED, not FINISHED: only a finished train run"),
    (evaluate, ["--run_id", "{parent}", "--threshold", "2"], "parameter threshold (evaluate.threshold): expected a number in [0, 1], got 2.0"),
    (evaluate, ["--run_id", "{parent}", "--min_improvement", "1"], "parameter min_improvement (evaluate.min_improvement): expected a number in [0, 1), got 1.0"),
    (evaluate, ["--run_id", "{parent}", "--data_dir", MISSING], f"data.dir (-P data_dir): {MISSING} is not a directory"),
    (infer, ["--input", MISSING], f"parameter input: no images found at '{MISSING}'; expected an image file, a directory or a glob"),
    (infer, ["--input", "{images}", "--output", "{tmp}"], "parameter output (infer.output): expected a file path ending in .csv or .jsonl (CSV or JSON Lines), got '{tmp}'"),
    (infer, ["--input", "{images}", "--output", "{tmp}/folder.csv"], "parameter output: {tmp}/folder.csv is a directory; expected a file path"),
    (infer, ["--input", "{images}", "--output", "{tmp}/file.csv/out.csv"], "parameter output: cannot create {tmp}/file.csv/out.csv: {tmp}/file.csv is not a writable directory"),
    (infer, ["--engine", "gpu"], "parameter engine (infer.engine): expected one of local, spark, got 'gpu'"),
    (infer, ["--runtime", "tensorrt"], "parameter runtime (infer.runtime): expected one of keras, onnx, litert, got 'tensorrt'"),
    (infer, ["--gradcam_top", "-1"], "parameter gradcam_top (infer.gradcam_top): expected an integer >= 0, got -1"),
    (infer, ["--allow_errors", "maybe"], "parameter allow_errors (infer.allow_errors): expected true or false, got 'maybe'"),
    (infer, ["--model_uri", "/tmp/model"], "parameter model_uri (infer.model_uri): expected models:/<name>/<version> or models:/<name>@<alias> with <name> one of Production_Reg, Testing_Reg"),
    (infer, ["--model_uri", "models://other@registry/Production_Reg/1"], "parameter model_uri (infer.model_uri): expected models:/"),
    (infer, ["--model_uri", "models:/SomeoneElses/1"], "parameter model_uri (infer.model_uri): expected models:/"),
    (infer, ["--model_uri", "https://example.com/model.keras"], "parameter model_uri (infer.model_uri): expected models:/"),
    (infer, ["--model_uri", f"runs:/{'a' * 32}/../../elsewhere"], "parameter model_uri (infer.model_uri): expected models:/"),
    (promote, ["--version", "abc", "--reason", "r"], "parameter version: expected a version number of the production model (1, 2, ...), got 'abc'"),
    (promote, ["--version", "0", "--reason", "r"], "parameter version: expected a version number of the production model (1, 2, ...), got '0'"),
    (promote, ["--version", "1", "--reason", " "], "parameter reason: say why, e.g. -P reason="),
    (promote, ["--version", "99", "--reason", "r"], "Production_Reg has no version 99"),
    (main, ["--env_manager", "docker"], "parameter env_manager: expected one of local, uv, virtualenv, conda, got 'docker'"),
    (main, ["--threshold", "high"], "parameter threshold (evaluate.threshold): expected a number, got 'high'"),
]  # fmt: skip

OWN = {evaluate: ("run_id",), promote: ("version", "reason"), main: ("env_manager",)}
STEP = {train: train.train, evaluate: evaluate.evaluate, infer: infer.infer, promote: promote.promote, main: main.main}


@pytest.mark.model
@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    BAD_PARAMETERS,
    ids=[f"{m.__name__.split('.')[-1]}:{' '.join(a)}" for m, a, _ in BAD_PARAMETERS],
)
def test_each_bad_parameter_fails_before_any_work_in_one_line(
    module, argv, expected, store_copy, tiny_data, tmp_path, capsys
):
    client, parent = store_copy
    (tmp_path / "folder.csv").mkdir()  # outputs in the way: a folder, and a file where a folder should be
    (tmp_path / "file.csv").write_text("")
    fill = {
        "{killed}": _killed_train_run(client, parent),
        "{parent}": parent,
        "{tmp}": str(tmp_path),
        "{images}": str(tiny_data / "test"),
    }
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        expected = expected.replace(key, value)
    before = snapshot(client)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(STEP[module], "", module.OVERRIDES, argv=argv, own=OWN.get(module, ()))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # The last line: MLflow may draw a progress bar first, reading the run's model description.
    assert err.splitlines()[-1].startswith(f"error: {expected}"), err
    assert "Traceback" not in err
    assert snapshot(client) == before  # nothing started, nothing registered
    assert_store_consistent(client)


@pytest.mark.model
def test_spark_without_java_fails_before_any_work_in_one_line(store_copy, tiny_data, tmp_path, monkeypatch, capsys):
    client, _ = store_copy
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-java"))  # where pyspark would look first
    before = snapshot(client)
    argv = ["--input", str(tiny_data / "test"), "--engine", "spark", "--output", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: parameter engine: spark needs Java 17 or newer, and Java was not found (JAVA_HOME={tmp_path}/no-java "
        f"has no bin/java); install it ({spark.JAVA_INSTALL})"
    )
    assert snapshot(client) == before


@pytest.mark.unit
@pytest.mark.parametrize(
    ("printed", "problem"),
    [('openjdk version "17.0.15" 2025-04-15', None), ('openjdk version "21" 2023-09-19', None),
     ('openjdk version "11.0.2" 2019-01-15', "is Java 11"), ('java version "1.8.0_292"', "is Java 8"),
     ("no version here", "is Java of an unknown version")],
)  # fmt: skip
def test_java_version_is_read_as_pyspark_finds_it(printed, problem, tmp_path, monkeypatch):
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(f"#!/bin/sh\necho '{printed}' >&2\n")
    java.chmod(0o755)
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    found = spark.java_problem()
    assert found == problem if problem is None else found.endswith(problem)


# --- Misuse: where models come from, where infer writes, what is logged ------------------------


@pytest.mark.model
@pytest.mark.parametrize("flavor", ["served", "keras"])  # keras: how versions were logged before issue 4
def test_a_model_that_needs_code_to_load_is_refused(flavor, store_copy, data, tmp_path):
    """A Lambda layer stores Python bytecode; Keras safe_mode (which we insist on) will not run it."""
    import keras
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    client, _ = store_copy
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Lambda(lambda x: x / 255.0)(inputs))
    )
    network = keras.Model(inputs, outputs)
    metadata = {"classes": ["ok_front", "def_front"], "image_size": 32, "decision_threshold": 0.5}
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(f"train/{EXPERIMENT}").experiment_id) as run:
        if flavor == "served":
            packaging.log_model(network, config_for(data, tmp_path), metadata, np.zeros((32, 32, 1)), exports=None)
        else:
            mlflow.keras.log_model(
                network,
                name="model",
                signature=ModelSignature(
                    Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 1))]),
                    Schema([TensorSpec(np.dtype(np.float32), (-1, 1))]),
                ),
                pip_requirements=packaging.model_requirements(),  # not inferred: that loads the model, which fails
                metadata=metadata,
            )
    before = snapshot(client)
    refused = (
        r"refused to load runs:/\w+/model: it needs code execution to load \(Keras safe_mode\)"
        if flavor == "served"  # a Keras-flavour model is refused before loading: not the layout train logs
        else r"model is not one train logged: its flavors are \['keras', 'python_function'\]"
    )
    with pytest.raises(PipelineError, match=refused):
        evaluate.evaluate(config_for(data, tmp_path), run.info.run_id)
    assert snapshot(client)[1] == before[1]  # nothing registered
    runs_uri = f"runs:/{run.info.run_id}/model"
    loads = f"refused to load {runs_uri}" if flavor == "served" else f"cannot load {runs_uri}: it is not a model train"
    with pytest.raises(PipelineError, match=loads):
        infer.infer(config_for(data, tmp_path, **{"infer.model_uri": runs_uri}))
    if flavor == "served":  # and the served model's own loader, as mlflow models serve runs it
        with pytest.raises(ValueError, match="safe_mode=False"):  # Keras refuses the Lambda
            mlflow.pyfunc.load_model(runs_uri)
    assert_store_consistent(client)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.model
def test_infer_writes_only_its_output_and_follows_no_link_out_of_the_input(store_copy, data, tmp_path, monkeypatch):
    client, _ = store_copy
    incoming = Path(shutil.copytree(data / "test", tmp_path / "incoming"))
    secret = tmp_path / "elsewhere" / "private.png"
    secret.parent.mkdir()
    shutil.copy(next(incoming.rglob("*.png")), secret)
    (incoming / "ok_front" / "link.png").symlink_to(secret)
    (incoming / "ok_front" / "linked_folder").symlink_to(secret.parent, target_is_directory=True)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {folder: _tree(folder) for folder in (incoming, secret.parent, work)}
    output = tmp_path / "out" / "scores.csv"

    with pytest.raises(infer.ImagesFailed):  # link.png: written with its error, then exit 1
        infer.infer(config_for(data, tmp_path, **{"infer.input": str(incoming), "infer.output": str(output)}))

    assert {folder: _tree(folder) for folder in (incoming, secret.parent, work)} == before
    assert sorted(p.name for p in output.parent.iterdir()) == ["scores.csv"]
    rows = {Path(r["path"]).name: r for r in csv.DictReader(output.open())}
    assert rows["link.png"]["error"] == f"a symlink to {secret}, outside the input {incoming}: not read"
    assert "private.png" not in rows  # a linked folder is not descended into
    assert_store_consistent(client)


@pytest.mark.model
@pytest.mark.slow  # trains and logs: 9 s on 2 cores
def test_no_secret_reaches_a_param_tag_metric_or_artifact(store_copy, data, tmp_path, monkeypatch):
    """Credentials in the environment and in .env (which configure() reads) are never logged."""
    client, _ = store_copy
    canaries = {"MLFLOW_TRACKING_PASSWORD": "canary-password-7f3a", "MLFLOW_TRACKING_TOKEN": "canary-token-91bc"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("AWS_SECRET_ACCESS_KEY=canary-aws-55d2\nexport API_KEY='canary-api-0e1f'\n")
    saved = dict(os.environ)
    try:
        os.environ.update(canaries)
        common = ["--experiment", EXPERIMENT]
        size = ["--hparams", "small", "--epochs", "1", "--image_size", "32", "--exports", "none"]
        parent = cli.main(train.train, "", train.OVERRIDES, argv=["--data_dir", str(data), *size, *common])
        argv = ["--data_dir", str(data), "--threshold", "0", "--run_id", parent, *common]
        cli.main(evaluate.evaluate, "", evaluate.OVERRIDES, argv=argv, own=OWN[evaluate])
        argv = ["--input", str(data / "test"), "--output", str(tmp_path / "p.csv"), *common]
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
        other = "1" if alias_version("Production_Reg", "prod") == "2" else "2"  # a real move, whoever won
        argv = ["--version", other, "--reason", "the other one, by hand", *common]
        cli.main(promote.promote, "", promote.OVERRIDES, argv=argv, own=OWN[promote])
        saw_env = {key: os.environ.get(key) for key in ("AWS_SECRET_ACCESS_KEY", "API_KEY")}
    finally:
        os.environ.clear()
        os.environ.update(saved)

    secrets = [s.encode() for s in ["canary-password-7f3a", "canary-token-91bc", "canary-aws-55d2", "canary-api-0e1f"]]
    # Everything the store holds: the database (params, tags, metrics, registry) and every artifact
    # file of every experiment (runs' artifacts and MLflow 3's logged models).
    roots = {Path(unquote(urlparse(e.artifact_location).path)) for e in client.search_experiments()}
    files = [*tmp_path.glob("mlflow.db*"), *(p for root in roots for p in root.rglob("*") if p.is_file())]
    assert len(files) > 20
    leaks = [(str(path), secret) for path in files for secret in secrets if secret in path.read_bytes()]
    assert leaks == []
    assert any(b"the other one, by hand" in path.read_bytes() for path in files)  # the scan sees what is logged
    # And the canaries were live: configure() had put the .env values in the environment.
    assert saw_env == {"AWS_SECRET_ACCESS_KEY": "canary-aws-55d2", "API_KEY": "canary-api-0e1f"}
    assert_store_consistent(client)


@pytest.mark.unit
def test_main_forwards_skip_bad_images_to_train_and_evaluate(tiny_data):
    config = load_config({"data.dir": str(tiny_data), "data.skip_bad_images": "true"})
    params = main.stage_parameters(config)
    assert params[contract.STAGE_TRAIN]["skip_bad_images"] == params[contract.STAGE_EVAL]["skip_bad_images"] == "true"


@pytest.mark.unit
@pytest.mark.parametrize(
    "uri",
    ["models:/Production_Reg@prod", "models:/Testing_Reg/3", "models:/Production_Reg/12", f"runs:/{'a1' * 16}/model"],
)
def test_model_uris_of_the_configured_registry_are_accepted(uri):
    assert load_config({"infer.model_uri": uri}).infer_model_uri == uri


@pytest.mark.data
def test_decoded_images_are_8_bit_gray_whatever_came_in(tmp_path):
    """Kinds the first decoder test does not cover: 1-bit, gray+alpha, CMYK JPEG, GIF, WebP, 16-bit TIFF."""
    cases = {
        "one_bit.png": Image.new("1", (9, 7), 1),
        "gray_alpha.png": Image.new("LA", (9, 7), (255, 0)),
        "cmyk.jpg": Image.new("CMYK", (9, 7), (0, 0, 0, 0)),
        "palette.gif": Image.new("P", (9, 7), 0),
        "rgb.webp": Image.new("RGB", (9, 7), (255, 255, 255)),
        "wide.tiff": Image.fromarray(np.full((7, 9), 65535, np.uint16)),
    }
    for name, image in cases.items():
        if image.mode == "P":
            image.putpalette([255, 255, 255] * 256)
        image.save(tmp_path / name)
        gray = decode_gray(tmp_path / name)
        assert gray.shape == (7, 9, 1) and gray.dtype == np.uint8, name
        assert gray.min() >= 250, name  # white in every encoding (alpha is ignored)


@pytest.mark.data
def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((10, 30), np.uint8)
    pixels[:, :3] = 255  # a bright left edge
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "turned.jpg", exif=exif, quality=100)
    gray = decode_gray(tmp_path / "turned.jpg")
    assert gray.shape == (30, 10, 1)  # shown upright: tall, not wide
    assert gray[:3, :, 0].mean() > 200 and gray[-3:, :, 0].mean() < 50  # the left edge is now on top
