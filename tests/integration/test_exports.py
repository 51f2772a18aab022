"""The ONNX and LiteRT exports train logs with every model: where they are, that they score as Keras
does, that docs/scoring.md's plain-Python snippet runs on one, and the errors when one cannot be used.

On copies of conftest's ``prod_world`` store: a tiny model trained and registered as train and
evaluate do, so its exports were made and checked by train and again by evaluate.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from conftest import world_config
from helpers import PROJECT_DIR, use_copy_of, write_bad
from steps import infer
from steps.core import contract
from steps.core.config import ConfigError
from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.inference import local
from steps.network import exports
from steps.served import serving

pytestmark = pytest.mark.model

MODEL = "models:/Production_Reg@prod"
EXPORT_KINDS = ("onnx", "litert", "spec")


@pytest.fixture
def store_copy(prod_world, tmp_path, monkeypatch):
    db, parent = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    yield mlflow.MlflowClient()
    while mlflow.active_run():
        mlflow.end_run()


def downloaded(client, folder: Path) -> dict[str, Path]:
    """The prod version's exports, fetched by the URIs its tags give: their local paths by kind."""
    version = client.get_model_version_by_alias("Production_Reg", "prod")
    return {
        kind: Path(mlflow.artifacts.download_artifacts(version.tags[contract.export_tag(kind)], dst_path=str(folder)))
        for kind in EXPORT_KINDS
    }


def test_the_version_tags_name_both_exports_and_their_spec_and_parity_was_logged(store_copy, tmp_path):
    client = store_copy
    version = client.get_model_version_by_alias("Production_Reg", "prod")
    source = version.tags[contract.VERSION_TAG_SOURCE_RUN_ID]
    for kind, name in {"onnx": "model.onnx", "litert": "model.tflite", "spec": "preprocessing.json"}.items():
        assert version.tags[contract.export_tag(kind)] == f"runs:/{source}/{contract.EXPORTS_ARTIFACT}/{name}"
    paths = downloaded(client, tmp_path)
    assert all(path.stat().st_size > 0 for path in paths.values())
    spec = json.loads(paths["spec"].read_text())
    metadata = mlflow.models.get_model_info(MODEL).metadata
    assert spec["input"]["height"] == spec["input"]["width"] == metadata["image_size"]
    assert spec["classes"] == metadata["classes"] and spec["decision_threshold"] == metadata["decision_threshold"]
    # Checked twice: by train on the validation images, by evaluate on the test images.
    eval_run = client.get_run(version.tags[contract.VERSION_TAG_EVAL_RUN_ID])
    for run in (client.get_run(source), eval_run):
        for runtime in ("onnx", "litert"):
            assert 0 <= run.data.metrics[contract.export_diff_metric(runtime)] <= exports.PARITY_TOLERANCE


def test_a_parity_check_that_fails_says_which_export_in_one_line(store_copy, tmp_path):
    paths = downloaded(store_copy, tmp_path)
    size = json.loads(paths["spec"].read_text())["input"]["height"]
    images = np.random.default_rng(0).uniform(0, 255, (6, size, size, 1)).astype("float32")
    prob = serving.load_export("onnx", paths["onnx"]).predict_on_batch(images).reshape(-1)
    assert exports.check_parity(paths, images, prob, 0.5)["onnx"] < 1e-6  # the same numbers pass
    with pytest.raises(PipelineError) as err:
        exports.check_parity(paths, images, prob + 1e-3, 0.5)
    message = str(err.value)
    assert "\n" not in message
    assert re.match(
        r"the onnx export model\.onnx does not match Keras on 6 images: largest difference 1\.00e-03", message
    )


def test_infer_with_each_runtime_writes_the_rows_keras_does(store_copy, tiny_data, tmp_path):
    incoming = Path(shutil.copytree(tiny_data / "test", tmp_path / "incoming"))
    write_bad("truncated", incoming, next((incoming / "def_front").glob("*.png")).read_bytes())
    rows = {}
    for runtime in serving.RUNTIMES:
        output = tmp_path / f"{runtime}.csv"
        overrides = {"infer.input": str(incoming), "infer.output": str(output), "infer.runtime": runtime,
                     "infer.allow_errors": "true", "infer.gradcam_top": "0"}  # fmt: skip
        infer.infer(world_config(tiny_data, tmp_path, **overrides))
        rows[runtime] = list(csv.DictReader(output.open()))
    keras_rows = rows["keras"]
    assert len(keras_rows) == 13 and sum(bool(r["error"]) for r in keras_rows) == 1
    for runtime in ("onnx", "litert"):
        assert [(r["path"], r["predicted_class"], r["error"]) for r in rows[runtime]] == [
            (r["path"], r["predicted_class"], r["error"]) for r in keras_rows
        ]
        diffs = [abs(float(a["defect_probability"]) - float(b["defect_probability"]))
                 for a, b in zip(rows[runtime], keras_rows, strict=True) if not a["error"]]  # fmt: skip
        assert len(diffs) == 12 and max(diffs) <= 1e-4, runtime


def readme_snippet() -> str:
    """The first Python block of docs/scoring.md's "Scoring without TensorFlow" section."""
    readme = (PROJECT_DIR / "docs" / "scoring.md").read_text()
    section = readme.split("## Scoring without TensorFlow", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


# Runs the README's snippet as a script, then says what it had imported.
RUN_SNIPPET = """
import runpy, sys
runpy.run_path("snippet.py", run_name="__main__")
print("modules:", " ".join(sorted(m for m in ("tensorflow", "keras", "mlflow") if m in sys.modules)))
"""


def test_the_readmes_snippet_scores_a_png_with_onnxruntime_alone(store_copy, tiny_data, tmp_path):
    paths = downloaded(store_copy, tmp_path)
    work = tmp_path / "line-side"
    work.mkdir()
    for kind in ("onnx", "spec"):
        shutil.copy(paths[kind], work)
    (work / "snippet.py").write_text(readme_snippet())
    image = sorted((tiny_data / "test" / "def_front").glob("*.png"))[0]  # 48 px: the snippet resizes it
    done = subprocess.run([sys.executable, "-I", "-c", RUN_SNIPPET, str(image)], cwd=work, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, modules = done.stdout.strip().splitlines()
    assert modules == "modules:"  # no TensorFlow, Keras or MLflow
    label, prob = printed[-1].split()
    model, _, _ = local.load_production_model(MODEL, 8)
    expected = model.predict(None, [image.read_bytes()]).iloc[0]
    assert label == expected["predicted_class"] and abs(float(prob) - expected["defect_probability"]) <= 1e-4


@pytest.mark.parametrize("runtime", ["onnx", "litert"])
def test_a_corrupt_export_fails_loading_in_one_line_naming_it(runtime, store_copy, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(MODEL, dst_path=str(tmp_path)))
    flavor = mlflow.models.Model.load(local).flavors["python_function"]
    broken = local / flavor["artifacts"][serving.EXPORT_ARTIFACTS[runtime]]["path"]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])  # truncated, as a copy cut short
    with pytest.raises(MlflowException) as err:
        mlflow.pyfunc.load_model(str(local), model_config={"runtime": runtime})
    message = err.value.message
    assert message.startswith(f"the {runtime} export {broken} cannot be loaded: ") and "\n" not in message
    # The same model still loads with Keras, whose network the cut file is not.
    assert mlflow.pyfunc.load_model(str(local)).unwrap_python_model().runtime == "keras"


@pytest.mark.unit
def test_a_runtime_other_than_keras_onnx_or_litert_is_refused():
    with pytest.raises(ConfigError, match=r"^infer\.runtime: expected one of keras, onnx, litert, got 'tensorflow'"):
        load_config({"infer.runtime": "tensorflow"})
    with pytest.raises(MlflowException, match="model config runtime: expected one of keras, onnx, litert, got 'tf'"):
        serving.check_config({"runtime": "tf"})


@pytest.mark.unit
def test_train_exports_takes_a_list_of_the_formats_or_none():
    assert load_config().train.export_formats == ("onnx", "litert")
    assert load_config({"train.exports": "onnx"}).train.export_formats == ("onnx",)
    assert load_config({"train.exports": "none"}).train.export_formats == ()
    for bad in ("onnx,tflite", "onnx,onnx", "none,onnx"):
        with pytest.raises(ConfigError, match=r"^train\.exports: expected a comma-separated list of onnx, litert"):
            load_config({"train.exports": bad})


def test_a_model_without_exports_scores_with_keras_and_names_the_missing_export(store_copy, tmp_path):
    from steps.network.model import make_model
    from steps.served import packaging

    conf = world_config(tmp_path, tmp_path)
    hp = conf.hparam_sets["small"]
    metadata = {"classes": list(conf.data.classes), "image_size": 32, "decision_threshold": 0.5}
    with mlflow.start_run() as run:  # as train logs a model with -P exports=none
        packaging.log_model(make_model(hp, 0), conf, metadata, np.zeros((32, 32, 1)), exports=None)
    uri = f"runs:/{run.info.run_id}/model"
    with pytest.raises(PipelineError) as err:
        local.load_production_model(uri, 8, "onnx")
    assert str(err.value) == (
        f"{uri} has no onnx export (trained with -P exports without it, or before train exported); use -P "
        "runtime=keras, or train and register it again"
    )
    with pytest.raises(MlflowException, match="model config runtime litert: this model has no litert export"):
        mlflow.pyfunc.load_model(uri, model_config={"runtime": "litert"})
    assert local.load_production_model(uri, 8, "keras")[0].runtime == "keras"
