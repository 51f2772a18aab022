"""The registered model wherever it is used: loaded alone, on bytes, over REST, in Spark, at folder scale.

One module-scoped store holds a trained tiny model as ``Production_Reg@prod``. The pyfunc is loaded
in a separate Python whose working directory is elsewhere and which cannot import this repository;
REST is the real ``mlflow models serve`` on loopback; Spark is a local session scoring through
``mlflow.pyfunc.spark_udf``; infer runs through its command line.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from conftest import world_config
from helpers import (
    BAD_FILES,
    PROJECT_DIR,
    encode,
    free_port,
    real_png,
    use_copy_of,
    wait_until_up,
    without_memory,
    write_bad,
)
from steps import infer
from steps.core import cli, contract
from steps.datasets.data import load_images
from steps.inference import local as local_engine
from steps.inference import spark
from steps.mlflow_io.loading import load_keras
from steps.network.explain import gradcam, last_feature_map

pytestmark = pytest.mark.model

EXPERIMENT = "serving"
MODEL = "models:/Production_Reg@prod"


def config_for(data: Path, tmp_path: Path, **overrides: str):
    return world_config(data, tmp_path, **{"experiment": EXPERIMENT, **overrides})


@pytest.fixture(scope="module")
def served(prod_world):
    """The store whose Production_Reg@prod is a model trained on the tiny set (conftest): its db path."""
    return prod_world[0]


@pytest.fixture
def store_copy(served, tmp_path, monkeypatch) -> str:
    uri = use_copy_of(served, tmp_path, monkeypatch)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


# --- Images of every kind ------------------------------------------------------------------


def kinds(cell: Image.Image) -> dict[str, bytes]:
    """One real cell as each kind of file a user may send."""
    gray = cell.convert("L")
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # 16-bit, full range
    return {
        "png_gray": encode(gray, "PNG"),
        "jpeg_gray": encode(gray, "JPEG", quality=95),
        "png_rgb": encode(gray.convert("RGB"), "PNG"),
        "jpeg_rgb": encode(gray.convert("RGB"), "JPEG", quality=95),
        "png_rgba": encode(gray.convert("RGBA"), "PNG"),
        "png_16bit": encode(sixteen, "PNG"),
        "png_other_size": encode(gray.resize((77, 50)), "PNG"),
        "bmp": encode(gray, "BMP"),
        "tiff": encode(gray, "TIFF"),
        "webp": encode(gray, "WEBP", lossless=True),
    }


def first_cell(data: Path) -> Image.Image:
    with Image.open(sorted((data / "test" / "def_front").glob("*.png"))[0]) as image:
        return image.copy()


# --- Spark -----------------------------------------------------------------------------------


@pytest.mark.skipif(spark.java_problem() is not None, reason=f"Spark needs Java 17+: {spark.java_problem()}")
@pytest.mark.slow
def test_spark_engine_predicts_what_the_local_engine_does(store_copy, tiny_data, tmp_path):
    incoming = Path(shutil.copytree(tiny_data / "test", tmp_path / "incoming"))
    (incoming / "def_front" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (incoming / "a folder, with 100% odd names").mkdir()  # Spark names files by URI: %-encoded
    shutil.copy(next((incoming / "ok_front").glob("*.png")), incoming / "a folder, with 100% odd names" / "é #1.png")
    rows = {}
    for engine in ("local", "spark"):
        output = tmp_path / f"{engine}.jsonl"
        # local[1]: one Spark Python worker to start (TensorFlow's import is most of the test); the
        # master string is Spark's own, and rows are put in order by infer whatever the partitions.
        argv = ["--input", str(incoming), "--output", str(output), "--engine", engine, "--allow_errors", "true",
                "--spark_master", "local[1]", "--experiment", EXPERIMENT]  # fmt: skip
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
        rows[engine] = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["path"] for r in rows["spark"]] == [r["path"] for r in rows["local"]]
    for local, remote in zip(rows["local"], rows["spark"], strict=True):
        assert remote["predicted_class"] == local["predicted_class"]
        assert remote["error"] == local["error"]
        if local["error"]:
            assert remote["defect_probability"] is None
        else:
            assert remote["defect_probability"] == pytest.approx(local["defect_probability"], abs=1e-6)
    assert sum(1 for r in rows["spark"] if r["error"]) == 1
    runs = mlflow.search_runs(experiment_names=[f"infer/{EXPERIMENT}"], output_format="list")
    assert sorted(r.data.tags[contract.TAG_INFER_ENGINE] for r in runs) == ["local", "spark"]


# --- The pyfunc, loaded alone ------------------------------------------------------------------

# Run by a separate Python (-I: no PYTHONPATH, no script or working directory on sys.path) in a
# folder of its own; an audit hook fails any attempt to open a file of this repository.
LOAD_ALONE = """
import importlib.util, json, sys
from pathlib import Path
repo = sys.argv[1]
def refuse(event, args):  # the repository, not the environment it happens to hold (.venv)
    if event == "open" and isinstance(args[0], str) and args[0].startswith(repo) and not args[0].startswith(sys.prefix):
        raise PermissionError(f"the model opened {args[0]}, a file of the repository")
sys.addaudithook(refuse)
assert importlib.util.find_spec("steps") is None, "steps is importable"
import mlflow, pandas as pd
inputs = json.loads(Path("inputs.json").read_text())
frame = pd.DataFrame({"image": [bytes.fromhex(h) for h in inputs.values()]})
# The exports first, while TensorFlow has not been imported: they must score without it.
for runtime in ("onnx", "litert", "keras"):
    model = mlflow.pyfunc.load_model(sys.argv[2], model_config={"runtime": runtime})
    out = model.predict(frame, params={"on_error": "row"})
    rows = dict(zip(inputs, out.to_dict("records")))
    rows["tensorflow imported"] = "tensorflow" in sys.modules
    Path(f"outputs_{runtime}.json").write_text(json.dumps(rows))
"""


# The tests that read what a separate Python (``alone``) or `mlflow models serve` (``rest_server``)
# made of the model: those processes start in seconds to tens of seconds, so `make test-fast` skips them.
beside_a_process = pytest.mark.slow


def start_server(served: Path, work: Path, **env: str) -> tuple[str, subprocess.Popen, Path]:
    """``mlflow models serve`` of Production_Reg@prod on loopback, started (not yet ready): (URI, process, log)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{served}", **env}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # MLflow starts uvicorn by name
    log = work / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", server, log


@pytest.fixture(scope="module")
def rest_server(served, tmp_path_factory):
    """The Keras model served, started (not yet ready): (URI, process, log).

    Started before ``alone`` so that its start-up (about 10 s of imports and loading) overlaps that one's.
    """
    uri, server, log = start_server(served, tmp_path_factory.mktemp("rest"))
    yield uri, server, log
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def onnx_server(rest_server, served, tmp_path_factory):
    """The same model served on its ONNX export: the model config from MLflow's SERVING_MODEL_CONFIG."""
    work = tmp_path_factory.mktemp("rest_onnx")
    uri, server, log = start_server(served, work, SERVING_MODEL_CONFIG='{"runtime": "onnx"}')
    yield uri, server, log
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def alone_runtimes(rest_server, onnx_server, served, tiny_data, tmp_path_factory):
    """What the registered model predicts, loaded with MLflow alone with each runtime of model config
    ``runtime``: ``(inputs, {runtime: {name: row}})``; each runtime's rows also say whether
    TensorFlow had been imported by then (the exports' runtimes load first)."""
    work = tmp_path_factory.mktemp("alone")
    files = sorted((tiny_data / "test").rglob("*.png"))
    inputs = {f"file:{p.relative_to(tiny_data)}": p.read_bytes() for p in files} | kinds(first_cell(tiny_data))
    inputs |= {f"bad:{kind}": make(real_png(tiny_data)) for kind, (make, _) in BAD_FILES.items()}
    (work / "inputs.json").write_text(json.dumps({name: data.hex() for name, data in inputs.items()}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{served}"
    repo = str(PROJECT_DIR)
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_ALONE, repo, MODEL], cwd=work, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return inputs, {r: json.loads((work / f"outputs_{r}.json").read_text()) for r in ("onnx", "litert", "keras")}


@pytest.fixture(scope="module")
def alone(alone_runtimes):
    """What the registered model predicts with Keras, loaded with MLflow alone: ``(inputs, {name: row})``."""
    inputs, outputs = alone_runtimes
    return inputs, outputs["keras"]


@beside_a_process
def test_the_exports_score_every_input_as_keras_does_without_tensorflow(alone_runtimes):
    inputs, outputs = alone_runtimes
    assert outputs["onnx"]["tensorflow imported"] is False
    assert outputs["litert"]["tensorflow imported"] is False
    assert outputs["keras"]["tensorflow imported"] is True  # the check can fail
    for runtime in ("onnx", "litert"):
        for name in inputs:
            row, keras_row = outputs[runtime][name], outputs["keras"][name]
            assert (row["predicted_class"], row["error"]) == (keras_row["predicted_class"], keras_row["error"]), name
            if keras_row["error"]:
                assert row["defect_probability"] is None, name
            else:
                assert abs(row["defect_probability"] - keras_row["defect_probability"]) <= 1e-4, (runtime, name)


@beside_a_process
def test_the_pyfunc_on_bytes_matches_the_keras_network_on_the_training_arrays(alone, store_copy, tiny_data):
    _, outputs = alone
    files = sorted((tiny_data / "test").rglob("*.png"))
    info = mlflow.models.get_model_info(MODEL)
    arrays, failures = load_images(files, int(info.metadata["image_size"]), progress=False)  # train's loader
    assert not failures
    keras_prob = load_keras(MODEL).predict(arrays, verbose=0).reshape(-1)
    pyfunc_prob = np.array([outputs[f"file:{p.relative_to(tiny_data)}"]["defect_probability"] for p in files])
    assert np.max(np.abs(pyfunc_prob - keras_prob)) < 1e-5
    cutoff = info.metadata["decision_threshold"]
    for p, prob in zip(files, pyfunc_prob, strict=True):
        row = outputs[f"file:{p.relative_to(tiny_data)}"]
        assert row["decision_threshold"] == pytest.approx(cutoff) and row["error"] == ""
        assert row["predicted_class"] == ("def_front" if prob >= cutoff else "ok_front")


@beside_a_process
def test_every_kind_of_image_scores(alone):
    inputs, outputs = alone
    names = [n for n in inputs if not n.startswith(("file:", "bad:"))]
    assert len(names) == 10
    for name in names:
        assert outputs[name]["error"] == "", name
        assert 0.0 <= outputs[name]["defect_probability"] <= 1.0, name
    # One cell, ten encodings: the lossless ones are the same pixels, so the same score.
    lossless = ["png_gray", "png_rgb", "png_rgba", "png_16bit", "bmp", "tiff", "webp"]
    assert (
        max(outputs[n]["defect_probability"] for n in lossless)
        - min(outputs[n]["defect_probability"] for n in lossless)
        < 1e-6
    )


@beside_a_process
def test_bad_bytes_get_their_reason_in_the_row(alone):
    _, outputs = alone
    for kind, (_, reason) in BAD_FILES.items():
        row = outputs[f"bad:{kind}"]
        assert row["error"].startswith(reason), (kind, row)
        assert row["predicted_class"] == "" and row["defect_probability"] is None


# --- REST ------------------------------------------------------------------------------------


def request(uri: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{uri}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, strict_json(response.read())
    except urllib.error.HTTPError as err:
        return err.code, strict_json(err.read())


def strict_json(body: bytes) -> dict:
    """JSON as the standard has it: NaN and Infinity, which Python would accept, are refused."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(body, parse_constant=refuse)


def one_image(data: bytes) -> dict:
    """The README's request: one image, base64, in dataframe_split."""
    return {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode("ascii")]]}}


def assert_serves_as_alone(uri: str, alone: tuple, tolerance: float) -> None:
    """A PNG, a JPEG and a 16-bit PNG, one per request: the rows the model loaded alone gave."""
    inputs, outputs = alone
    for name in ("png_gray", "jpeg_rgb", "png_16bit"):
        status, body = request(uri, one_image(inputs[name]))
        assert status == 200, body
        (row,) = body["predictions"]
        assert row["error"] == "" and row["predicted_class"] == outputs[name]["predicted_class"]
        assert abs(row["defect_probability"] - outputs[name]["defect_probability"]) <= tolerance


@beside_a_process
def test_mlflow_models_serve_scores_base64_png_and_jpeg_and_answers_400_to_bad_images(rest_server, alone, tiny_data):
    uri, server, log = rest_server
    inputs, outputs = alone
    assert wait_until_up(f"{uri}/ping", server, timeout=180), log.read_text()[-3000:]
    assert_serves_as_alone(uri, alone, 1e-6)

    # The model's own serving example, as MLflow stored it with the model.
    example = (Path(mlflow.artifacts.download_artifacts(MODEL)) / "serving_input_example.json").read_text()
    status, body = request(uri, json.loads(example))
    assert status == 200 and body["predictions"][0]["error"] == ""

    for kind, (make, reason) in BAD_FILES.items():
        status, body = request(uri, one_image(make(real_png(tiny_data))))
        assert status == 400, (kind, body)
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        assert body["message"].startswith(f"row 0 of 1 cannot be used: {reason}"), (kind, body["message"])
        assert "Failed to predict data" not in body["message"]  # the upload is not echoed back

    # A served model does not open files its callers name.
    status, body = request(uri, {"dataframe_split": {"columns": ["path"], "data": [["/etc/hostname"]]}})
    assert status == 400 and "column path: this model does not read files" in body["message"]
    # on_error=row: a batch with a bad image scores the rest.
    batch = {"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(inputs["png_gray"]).decode()], [base64.b64encode(b"").decode()]]},
        "params": {"on_error": "row"}}  # fmt: skip
    status, body = request(uri, batch)
    assert status == 200
    assert [r["error"] for r in body["predictions"]] == ["", "empty file (0 bytes)"]
    assert body["predictions"][1]["defect_probability"] is None  # null: strict_json refused NaN


@beside_a_process
def test_mlflow_models_serve_on_the_onnx_export_answers_as_keras_does(onnx_server, alone):
    uri, server, log = onnx_server
    assert wait_until_up(f"{uri}/ping", server, timeout=180), log.read_text()[-3000:]
    assert_serves_as_alone(uri, alone, 1e-4)
    status, body = request(uri, one_image(b""))
    assert status == 400 and body["message"].startswith("row 0 of 1 cannot be used: empty file (0 bytes)")


@beside_a_process
def test_rest_refuses_other_formats_and_a_request_over_the_pixel_cap_with_400(rest_server, alone):
    uri, server, log = rest_server
    assert wait_until_up(f"{uri}/ping", server, timeout=180), log.read_text()[-3000:]
    gray = Image.new("L", (40, 40), 128)
    for fmt in ("PCX", "TGA", "PPM", "ICO", "EPS"):
        status, body = request(uri, one_image(encode(gray, fmt)))
        assert status == 400 and body["message"].startswith(
            "row 0 of 1 cannot be used: not a PNG, JPEG, BMP, TIFF, GIF or WebP image"
        ), (fmt, body)
    # Five black 8k frames: 65 KB each to send, 335 million pixels to decode. Refused from the headers.
    frame = base64.b64encode(encode(Image.new("L", (8192, 8192)), "PNG")).decode()
    status, body = request(uri, {"dataframe_split": {"columns": ["image"], "data": [[frame]] * 5}})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == (
        "the 5 images of this request hold more than 268,435,456 pixels together (model config "
        "max_request_pixels); send fewer or smaller images per request"
    )


# Peak memory of one predict call, in a Python of its own: resident set before and after.
PEAK_RSS = """
import io, json, resource, sys
import mlflow, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
def png(side):
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()
model.predict(pd.DataFrame({"image": [png(300)] * 2}))  # TensorFlow and the resize warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = model.predict(pd.DataFrame({"image": [png(int(sys.argv[2]))] * int(sys.argv[3])}))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": len(out), "errors": int((out["error"] != "").sum()), "grew_mb": (after - before) / 1024}))
"""


@pytest.mark.slow
def test_sixteen_4k_frames_in_one_request_cost_a_bounded_peak_memory(served, tmp_path):
    """Sixteen 4096 x 4096 PNGs (the default cap, 268 MP): stacked and converted to float32 before
    resizing, as preprocessing did, they took over 1 GB more; resized one by one as decoded, a few
    hundred MB at most, whatever the number of images (the growth measured: BENCHMARKS.md)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{served}"}
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, MODEL, "4096", "16"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    peak = json.loads(done.stdout.strip().splitlines()[-1])
    assert peak["rows"] == 16 and peak["errors"] == 0
    assert peak["grew_mb"] < 400, peak  # the float32 stack alone was 16 x 64 MB = 1,024 MB


# --- infer at folder scale -------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_infer_leaves_the_previous_predictions_untouched(store_copy, tiny_data, tmp_path):
    output = tmp_path / "predictions.csv"
    output.write_text("path,predicted_class,defect_probability,decision_threshold,error\nold.png,ok_front,0.1,0.5,\n")
    before = output.read_bytes()
    cmd = [sys.executable, str(PROJECT_DIR / "tests" / "signal_at.py"), "SIGKILL", "steps.core.progress:Progress.step",
           "raise", "infer", "--", "--input", str(tiny_data / "test"), "--output", str(output),
           "--experiment", EXPERIMENT]  # fmt: skip
    done = subprocess.run(cmd, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert "signal_at: SIGKILL at steps.core.progress:Progress.step" in done.stderr  # killed with rows being written
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]  # the partial rows went aside

    # Finished, the new file replaces the old one whole.
    cli.main(infer.infer, "", infer.OVERRIDES, argv=["--input", str(tiny_data / "test"), "--output", str(output),
                                                     "--experiment", EXPERIMENT])  # fmt: skip
    rows = output.read_text().splitlines()
    assert len(rows) == 1 + len(list((tiny_data / "test").rglob("*.png"))) and "old.png" not in output.read_text()


def test_infer_takes_a_glob_writes_json_lines_and_exits_1_on_unreadable_images(store_copy, tiny_data, tmp_path, capsys):
    incoming = Path(shutil.copytree(tiny_data / "test", tmp_path / "incoming"))
    (incoming / "ok_front" / "nested").mkdir()
    shutil.copy(next((incoming / "ok_front").glob("*.png")), incoming / "ok_front" / "nested" / "deep.png")
    bad = [write_bad(kind, incoming / "def_front", real_png(tiny_data)) for kind in ("truncated", "zero_byte")]
    # Links out of the glob's root, a file and a folder: reported, never read (glob follows folder links).
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "private.png").write_bytes(real_png(tiny_data))
    (incoming / "ok_front" / "link.png").symlink_to(elsewhere / "private.png")
    (incoming / "ok_front" / "folder").symlink_to(elsewhere, target_is_directory=True)
    output = tmp_path / "out" / "scores.jsonl"
    argv = ["--input", f"{incoming}/**/*.png", "--output", str(output), "--gradcam_top", "3",
            "--experiment", EXPERIMENT]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
    assert done.value.code == 1
    printed = capsys.readouterr()
    err = printed.err.strip().splitlines()[-1]
    found = sorted(glob.glob(f"{incoming}/**/*.png", recursive=True))
    assert err == (
        f"error: 4 of {len(found)} images could not be read; every row is in {output} "
        "(see its error column) and in the run's artifacts; pass -P allow_errors=true to exit 0 anyway"
    )

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["path"] for r in rows] == found  # recursive glob, in order
    outside = f"a symlink to {elsewhere / 'private.png'}, outside the input {incoming}: not read"
    assert {r["path"]: r["error"].split(" (")[0] for r in rows if r["error"]} == {
        str(bad[0]): "corrupt or truncated image data",
        str(bad[1]): "empty file",
        str(incoming / "ok_front" / "link.png"): outside,
        str(incoming / "ok_front" / "folder" / "private.png"): outside,
    }
    for r in rows:
        assert set(r) == {"path", "predicted_class", "defect_probability", "decision_threshold", "error"}
        if not r["error"]:  # typed values, not strings
            assert isinstance(r["defect_probability"], float) and isinstance(r["decision_threshold"], float)
            assert r["predicted_class"] == (
                "def_front" if r["defect_probability"] >= r["decision_threshold"] else "ok_front"
            )
        else:
            assert r["defect_probability"] is None and r["predicted_class"] == ""

    (run,) = mlflow.search_runs(experiment_names=[f"infer/{EXPERIMENT}"], output_format="list")
    assert run.info.status == "FINISHED"
    n_defect = sum(r["predicted_class"] == "def_front" for r in rows)
    scored = len(rows) - 4
    assert without_memory(run.data.metrics) == {"n_images": len(rows), "n_scored": scored, "n_errors": 4,
                                                "n_defect": n_defect, "n_review": min(scored, 16)}  # fmt: skip
    summary = printed.out.strip().splitlines()[-1]  # scored and unreadable counted apart
    assert summary.startswith(f"{len(rows)} images, {len(rows) - 4} scored with ")
    assert summary.endswith(f"{len(rows) - 4 - n_defect} ok_front; 4 unreadable -> {output}")
    assert run.data.tags[contract.TAG_MODEL_VERSION] == "1" and run.data.tags[contract.TAG_INFER_ENGINE] == "local"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "scores.jsonl" in artifacts
    assert (contract.GRADCAM_ARTIFACT in artifacts) == (n_defect > 0)

    # Told to, it exits 0 and returns the run.
    run_id = cli.main(infer.infer, "", infer.OVERRIDES, argv=[*argv, "--allow_errors", "true"])
    assert mlflow.get_run(run_id).data.metrics["n_errors"] == 4


def test_gradcam_grid_shows_the_most_confident_defects(store_copy, tiny_data, tmp_path):
    from steps.served.serving import DefectModel

    network = load_keras(MODEL)
    # A cut-off of 0 makes every image a defect, so the grid's content does not hang on the tiny model.
    model = DefectModel(network, {"classes": ["ok_front", "def_front"], "decision_threshold": 0.0, "image_size": 32})
    files = sorted((tiny_data / "test").rglob("*.png"))
    prob = model.predict(None, [p.read_bytes() for p in files])["defect_probability"].tolist()
    defects = list(zip(prob, map(str, files), strict=True))
    with mlflow.start_run() as run:
        local_engine.log_gradcam(model, defects, top=5, root=tiny_data / "test", uri=MODEL, max_bytes=2**24)
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/{contract.GRADCAM_ARTIFACT}", dst_path=str(tmp_path)
    )
    with Image.open(local) as grid:
        assert grid.format == "PNG" and grid.width > 400 and grid.height > 300  # 4 columns, 2 rows of maps


def test_gradcam_points_at_the_evidence():
    """A network that sees a defect in bright pixels: its heat map must sit on the bright patch."""
    import keras

    inputs = keras.Input((16, 16, 1))
    conv = keras.layers.Conv2D(1, 1, use_bias=False, name="conv")(inputs)
    features = keras.layers.Activation("relu", name="relu")(conv)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(pooled)
    network = keras.Model(inputs, outputs)
    network.get_layer("conv").set_weights([np.ones((1, 1, 1, 1))])  # features = pixels
    network.get_layer("out").set_weights([np.full((1, 1), 0.1), np.zeros(1)])  # brighter = more defect
    assert last_feature_map(network) == "relu"
    image = np.zeros((1, 16, 16, 1), np.float32)
    image[0, 10:14, 2:6] = 200.0  # bottom left
    (heat,) = gradcam(network, image)
    assert heat.shape == (16, 16) and heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert heat[10:14, 2:6].mean() > 0.9 and heat[:8].max() < 0.05  # on the patch, nothing far from it


def test_infer_with_a_lost_tracking_server_says_so_in_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ci:canary-token-6b0e@127.0.0.1:{port}")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    argv = ["--input", str(tiny_data / "test"), "--output", str(tmp_path / "p.csv")]
    with pytest.raises(SystemExit) as done:
        cli.main(infer.infer, "", infer.OVERRIDES, argv=argv)
    assert done.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # The URI's credentials went to the variables MLflow's client reads; the line names the server alone.
    assert len(lines) == 1
    assert lines[0].startswith(f"error: cannot reach the tracking server at http://127.0.0.1:{port} (")
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "canary-token-6b0e" and "canary-token-6b0e" not in lines[0]
