"""The adversarial review's holes, each shown closed: formats, wide gray, model config, pixel caps,
promotion under races and errors, history records, inputs, data materialisation, model loading
and credentials. The model-scale halves (REST, memory, a killed infer) are in test_serving.py.
"""

from __future__ import annotations

import http.server
import io
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from helpers import PROJECT_DIR, encode
from steps.core import errors
from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.datasets import elpv
from steps.datasets.data import SPLITS, DataError, scan_split
from steps.inference import local
from steps.mlflow_io import loading, registration, registry, rule, tracking
from steps.mlflow_io.registration import register_and_promote
from steps.mlflow_io.registry import alias_version
from steps.promote import promote
from steps.served import serving
from steps.served.serving import FORMATS, DefectModel, ImageError, decode_gray

pytestmark = pytest.mark.unit
CONFIG = load_config({"experiment": "test"})
REG = CONFIG.registry
D1 = "aaaaaaaaaaaaaaaa"
CLASSES = ("ok_front", "def_front")


# --- Formats and gray levels ---------------------------------------------------------------


def saved_as(fmt: str) -> bytes | None:
    """A small gray image saved by Pillow as ``fmt``; None when this Pillow cannot write it here."""
    image = Image.new("RGB", (16, 16), (90, 120, 150))
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except Exception:  # noqa: BLE001 - some writers need an optional library or a special mode
        try:
            buffer = io.BytesIO()
            image.convert("L").save(buffer, format=fmt)
        except Exception:  # noqa: BLE001
            return None
    return buffer.getvalue() or None


Image.init()  # every plugin Pillow has, registered
OTHER_FORMATS = sorted(set(Image.SAVE) - set(FORMATS) - {"MPO"})  # MPO is a JPEG, opened as one


def test_only_the_listed_formats_are_opened():
    for fmt in FORMATS:
        assert decode_gray(saved_as(fmt)).shape == (16, 16, 1), fmt
    refused = []
    for fmt in OTHER_FORMATS:
        data = saved_as(fmt)
        if data is None:
            continue
        with pytest.raises(ImageError, match=r"^not a PNG, JPEG, BMP, TIFF, GIF or WebP image \(\d+ bytes\)"):
            decode_gray(data)
        refused.append(fmt)
    # PCX, TGA, SGI, PPM, ICO, DDS, QOI, XBM, ICNS, JPEG 2000 and EPS were all read before.
    assert {"PCX", "TGA", "SGI", "PPM", "ICO", "EPS", "JPEG2000"} <= set(refused), refused


def test_each_other_format_gets_its_row_error_and_fails_a_raise_call():
    model = DefectModel(ZeroNetwork(), {"classes": list(CLASSES), "image_size": 16})
    pcx, png = saved_as("PCX"), saved_as("PNG")
    out = model.predict(None, pd.DataFrame({"image": [pcx, png]}), params={"on_error": "row"})
    assert out["error"][0].startswith("not a PNG, JPEG, BMP, TIFF, GIF or WebP image") and out["error"][1] == ""
    with pytest.raises(serving.BadInput, match=r"^row 0 of 1 cannot be used: not a PNG, JPEG"):
        model.predict(None, pd.DataFrame({"image": [pcx]}))


def tiff32(values: list[int]) -> bytes:
    return encode(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")


def test_32_bit_gray_is_scaled_by_its_range_not_by_the_files_maximum():
    half = 2**30
    dim, bright = decode_gray(tiff32([half, half])), decode_gray(tiff32([half, 2**31 - 1]))
    assert dim[0, 0, 0] == bright[0, 0, 0] == 127  # the same value, the same gray, whatever else is in the file
    assert bright[0, 1, 0] == 255
    assert decode_gray(tiff32([-5, 0]))[0, :, 0].tolist() == [0, 0]
    sixteen = encode(Image.fromarray(np.array([[65535, 257]], dtype=np.uint16)), "PNG")
    assert decode_gray(sixteen)[0, :, 0].tolist() == [255, 1]


# --- The model config and the pixel cap ------------------------------------------------------


class ZeroNetwork:
    """A network stand-in: probability 0 for every image (the tests here are about the input side)."""

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        return np.zeros((len(images), 1))


@pytest.mark.parametrize("value", ["false", "true", 1, 0, None, [True]])
def test_read_paths_takes_only_a_real_boolean(value):
    with pytest.raises(MlflowException, match=r"model config read_paths: expected true or false, got "):
        DefectModel(ZeroNetwork(), {"classes": list(CLASSES), "image_size": 16, "read_paths": value})


@pytest.mark.parametrize("value", [-1, "100", 1.5, True])
def test_max_request_pixels_takes_only_a_whole_number(value):
    with pytest.raises(MlflowException, match=r"model config max_request_pixels: expected a whole number >= 0"):
        DefectModel(ZeroNetwork(), {"classes": list(CLASSES), "image_size": 16, "max_request_pixels": value})


def test_a_call_over_the_pixel_cap_is_refused_before_any_image_is_decoded(monkeypatch):
    model = DefectModel(ZeroNetwork(), {"classes": list(CLASSES), "image_size": 16, "max_request_pixels": 3 * 64 * 64})
    frames = [encode(Image.new("L", (64, 64)), "PNG")] * 4
    decoded = []
    monkeypatch.setattr(serving, "decode_gray", lambda source, *a: decoded.append(1) or np.zeros((64, 64, 1)))
    for on_error in ("raise", "row"):  # a request-wide limit, whatever a bad row would do
        with pytest.raises(serving.BadInput) as err:
            model.predict(None, pd.DataFrame({"image": frames}), params={"on_error": on_error})
        assert err.value.message == (
            "the 4 images of this request hold more than 12,288 pixels together (model config max_request_pixels); "
            "send fewer or smaller images per request"
        )
    assert decoded == []
    assert len(model.predict(None, pd.DataFrame({"image": frames[:3]}))) == 3  # at the cap: scored
    unlimited = DefectModel(ZeroNetwork(), {**model.config, "max_request_pixels": 0})
    assert len(unlimited.predict(None, pd.DataFrame({"image": frames * 4}))) == 16


# --- Promotion: margins, rollbacks, errors, unfinished evaluations ---------------------------


def register(acc: float, cfg=None, tags=None, run_id=None):
    return register_and_promote(
        mlflow.MlflowClient(), cfg or CONFIG, "file:///nowhere", acc, D1, tags or {}, eval_run_id=run_id
    )


def holder() -> str | None:
    return alias_version(REG.production, REG.alias)


def test_a_stale_write_with_a_margin_still_ends_on_the_best_version(store):
    """v1 0.80 holds; this evaluation decides on v2 0.86; meanwhile v3 0.90 registers and takes prod;
    the stale write puts v2 on prod. 0.90 - 0.86 is below the margin, yet v3 must win back."""
    strict = load_config({"experiment": "test", "evaluate.min_improvement": "0.05"})
    first = register(0.80, strict)
    client = mlflow.MlflowClient()
    tags = {"acc": "0.86", "test_digest": D1}
    mine = str(client.create_model_version(REG.production, "file:///a", tags=tags).version)
    injected = []

    def meanwhile():
        if not injected:
            injected.append(register(0.90, strict))  # another evaluation, start to finish: 1 -> 3

    start, end, _ = registry.settle(client, REG, D1, 0.05, before_write=meanwhile)
    assert (start, end, holder()) == (first.version, injected[0].version, injected[0].version)
    events = registry.history(client, REG)
    assert [(e["from"], e["to"]) for e in events][-2:] == [(first.version, mine), (mine, injected[0].version)]
    assert "which this evaluation had just put on prod" in events[-1]["reason"]
    assert all(e["state"] == "done" for e in events)


def test_a_margin_still_keeps_a_holder_found_in_place(store):
    strict = load_config({"experiment": "test", "evaluate.min_improvement": "0.05"})
    first = register(0.86, strict)
    assert not register(0.90, strict).promoted and holder() == first.version


@pytest.mark.usefixtures("unchecked_files")
def test_a_rollback_sticks_when_an_evaluation_settles_around_its_move(store, capsys):
    v1, v2 = (register(acc).version for acc in (0.70, 0.90))
    real_move = registry.move_alias
    settled = []

    def settles_around(client, reg, to, came_from, action, *args):
        if action != "promote":
            return real_move(client, reg, to, came_from, action, *args)
        settled.append(registry.settle(client, reg, D1, 0.0).holder)  # an evaluation just before the move
        event = real_move(client, reg, to, came_from, action, *args)
        settled.append(registry.settle(client, reg, D1, 0.0).holder)  # and just after it
        return event

    registry.move_alias = settles_around
    try:
        promote(CONFIG, v1, "v2 misses cracks")
    finally:
        registry.move_alias = real_move
    # v2 was blocked before the move: neither settle could hand prod back to it.
    assert settled == [v1, v1] and holder() == v1
    assert capsys.readouterr().out.strip().endswith(f"blocked from automatic promotion: {v2}")


@pytest.mark.usefixtures("unchecked_files")
def test_promote_reports_failure_when_prod_is_moved_away_after_its_move(store, capsys):
    v1, _ = (register(acc).version for acc in (0.70, 0.80))
    real_move = registry.move_alias

    def then_a_better_model(client, reg, to, *args):
        event = real_move(client, reg, to, *args)
        if args[1] == "promote":
            register(0.95)  # a newer, better evaluation takes prod, as it may
        return event

    registry.move_alias = then_a_better_model
    try:
        with pytest.raises(
            PipelineError, match=rf"^Production_Reg@prod is on version 3, not {v1}: an evaluation moved"
        ):
            promote(CONFIG, v1, "v2 misses cracks")
    finally:
        registry.move_alias = real_move
    assert holder() == "3"


def test_an_error_reading_the_alias_fails_and_leaves_prod_alone(store, monkeypatch):
    champion = register(0.70)

    def unavailable(self, name, alias):
        raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias", unavailable)
    with pytest.raises(PipelineError, match=r"^cannot read Production_Reg@prod \(503 Service Unavailable\); nothing"):
        register(0.99)
    monkeypatch.undo()
    assert holder() == champion.version


def test_a_transient_error_rescoring_the_champion_fails_and_leaves_prod_alone(store, monkeypatch):
    with mlflow.start_run() as its_evaluation:
        pass
    champion = register(0.90, tags={"eval_run_id": its_evaluation.info.run_id})  # registered by evaluate
    client = mlflow.MlflowClient()
    test = SimpleNamespace(y=np.array([0, 1]))

    def flaky(uri):
        raise MlflowException("Max retries exceeded with url: /get-artifact (Caused by ConnectionResetError)")

    def rescore(version):  # the store fails while the champion's model is read
        monkeypatch.setattr(mlflow.models, "get_model_info", flaky)
        return registration.rescore(client, REG, test, "c" * 16, version)

    with pytest.raises(PipelineError) as err:
        register_and_promote(client, CONFIG, "file:///nowhere", 0.75, "c" * 16, {}, rescore=rescore)
    assert str(err.value).startswith(f"cannot read prod version {champion.version} to score it on this test set")
    assert f"Production_Reg@prod left on version {champion.version}; restore its files" in str(err.value)
    assert str(err.value).endswith("mlflow run . -e promote -P version=<N> -P reason=...")
    assert "\n" not in str(err.value)
    assert holder() == champion.version

    # A version that is no model of this pipeline can never be scored: it counts as unscored.
    monkeypatch.setattr(mlflow.models, "get_model_info", lambda uri: SimpleNamespace(flavors={"sklearn": {}}))
    with mlflow.start_run():
        assert registration.rescore(client, REG, test, "c" * 16, champion.version) is None


def test_a_version_whose_evaluation_did_not_finish_never_takes_prod(store):
    champion = register(0.70)
    with mlflow.start_run() as killed:
        pass
    mlflow.MlflowClient().set_terminated(killed.info.run_id, "KILLED")
    orphan = mlflow.MlflowClient().create_model_version(
        REG.production, "file:///a", tags={"acc": "0.99", "test_digest": D1, "eval_run_id": killed.info.run_id}
    )
    later = register(0.72)
    assert later.promoted and holder() == later.version != str(orphan.version)
    # Its own evaluation, still open while it settles, counts: that is how any version gets prod.
    with mlflow.start_run() as running:
        own = register(0.80, tags={"eval_run_id": running.info.run_id}, run_id=running.info.run_id)
    assert own.promoted and holder() == own.version
    assert champion.version != holder()


def test_a_move_is_recorded_as_intended_before_the_alias_changes(store):
    first = register(0.70)
    client = mlflow.MlflowClient()
    original = client.set_registered_model_alias

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between the record and the move

    client.set_registered_model_alias = killed
    with pytest.raises(KeyboardInterrupt):
        registry.move_alias(client, REG, "2", first.version, "evaluate", "a test", None)
    client.set_registered_model_alias = original
    events = registry.history(client, REG)
    assert holder() == first.version
    assert [e["state"] for e in events] == ["done", "intended"]
    shown = rule.format_history(events, REG.production, REG.alias)
    assert shown.splitlines()[-1].endswith("[intended, not confirmed: the process stopped around this move]")


def test_a_move_overtaken_before_its_reply_still_sorts_before_the_holder_s_own(store):
    """Another process moves prod after this write lands but before its reply arrives (a busy
    server): that process's clock reads earlier than this one's, yet its move is the last."""
    first, second = register(0.70), register(0.60)
    client, other = mlflow.MlflowClient(), mlflow.MlflowClient()
    original = client.set_registered_model_alias

    def overtaken(name, alias, version):
        original(name, alias, version)
        registry.move_alias(other, REG, first.version, version, "promote", "the other process", None)

    client.set_registered_model_alias = overtaken
    registry.move_alias(client, REG, second.version, first.version, "promote", "this process", None)
    events = registry.history(client, REG)
    assert holder() == first.version
    assert [(e["to"], e["reason"]) for e in events[-2:]] == [
        (second.version, "this process"),
        (first.version, "the other process"),
    ]


# --- Inputs: links in every form ---------------------------------------------------------------


def test_a_glob_root_is_its_directory_part_before_the_first_wildcard():
    assert local.glob_root("incoming/**/*.png") == Path("incoming")
    assert local.glob_root("/data/line2/cam[12]/*.png") == Path("/data/line2")
    assert local.glob_root("*.png") == Path(".")


def test_every_input_form_refuses_links_out_of_its_root(tmp_path):
    incoming, elsewhere = tmp_path / "incoming", tmp_path / "elsewhere"
    (incoming / "a").mkdir(parents=True)
    elsewhere.mkdir()
    Image.new("L", (8, 8)).save(elsewhere / "private.png")
    Image.new("L", (8, 8)).save(incoming / "a" / "mine.png")
    (incoming / "a" / "link.png").symlink_to(elsewhere / "private.png")
    (incoming / "folder").symlink_to(elsewhere, target_is_directory=True)

    outside = f"a symlink to {elsewhere / 'private.png'}, outside the input"
    for spec in (str(incoming), f"{incoming}/**/*.png"):
        files, root = local.resolve_inputs(spec)
        read = {p.relative_to(incoming).as_posix(): local.outside_input(p, root) for p in files}
        assert read["a/mine.png"] is None
        assert read["a/link.png"].startswith(outside)
        if spec == str(incoming):  # a directory: a linked folder is not descended into
            assert "folder/private.png" not in read
        else:  # a glob follows it: the file is listed, and refused
            assert read["folder/private.png"].startswith(outside)
    files, root = local.resolve_inputs(str(incoming / "a" / "link.png"))
    assert root == incoming / "a" and local.outside_input(files[0], root) is not None
    # Grad-CAM reads a file again: a file swapped for a link since scoring is not followed.
    (incoming / "a" / "mine.png").unlink()
    (incoming / "a" / "mine.png").symlink_to(elsewhere / "private.png")
    assert local.read_again(str(incoming / "a" / "mine.png"), incoming, 2**20) is None


# --- Data: all or nothing -----------------------------------------------------------------------


@pytest.mark.data
def test_a_copy_of_elpv_that_died_between_its_splits_is_done_again(tmp_path, monkeypatch):
    monkeypatch.setattr(elpv, "PROJECT_DIR", tmp_path)
    labels = elpv.elpv_labels()
    monkeypatch.setattr(elpv, "elpv_labels", lambda: labels.iloc[::40].reset_index(drop=True))  # 66 cells
    config = load_config({"data.dir": str(tmp_path / "data")})
    real_rename = elpv.os.rename

    def dies_after_train(src, dst):
        real_rename(src, dst)
        if Path(dst).name == "train":
            raise SystemExit("killed")  # a death between the two splits

    monkeypatch.setattr(elpv.os, "rename", dies_after_train)
    with pytest.raises(SystemExit):
        elpv.ensure_data(config)
    data = tmp_path / "data"
    assert (data / "train").is_dir() and not (data / "test").exists() and (data / elpv.INCOMPLETE).exists()
    (data / f"{elpv.STAGING_PREFIX}left-by-sigkill").mkdir()  # what a SIGKILL leaves besides

    monkeypatch.setattr(elpv.os, "rename", real_rename)
    elpv.ensure_data(config)
    assert not (data / elpv.INCOMPLETE).exists() and not list(data.glob(f"{elpv.STAGING_PREFIX}*"))
    manifest = pd.read_csv(data / "manifest.csv")
    for split in SPLITS:
        assert len(scan_split(data, split, CLASSES)) == int((manifest["split"] == split).sum())


@pytest.mark.data
def test_a_half_copy_with_files_of_the_users_own_is_not_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(elpv, "PROJECT_DIR", tmp_path)
    monkeypatch.setattr(elpv, "elpv_split", lambda labels, classes: pd.DataFrame({"file": ["train/ok_front/a.png"]}))
    mine = tmp_path / "data" / "train" / "ok_front" / "mine.png"
    mine.parent.mkdir(parents=True)
    Image.new("L", (8, 8)).save(mine)
    (tmp_path / "data" / elpv.INCOMPLETE).write_text("")
    with pytest.raises(DataError, match=r"half-finished copy of ELPV .* also .*mine.png, which is not part of it"):
        elpv.ensure_data(load_config({"data.dir": str(tmp_path / "data")}))
    assert mine.exists()


# --- Model loading --------------------------------------------------------------------------------


def crafted(tmp_path: Path, flavors: dict, metadata: dict | None = None) -> str:
    """A model directory with only an ``MLmodel`` of these flavors: what an attacker could register."""
    model = tmp_path / "crafted"
    model.mkdir()
    mlmodel = {"flavors": flavors, "model_uuid": "0" * 32, "utc_time_created": "2026-01-01 00:00:00"}
    if metadata is not None:
        mlmodel["metadata"] = metadata
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return str(model)


def test_a_keras_model_saved_as_a_savedmodel_is_refused(tmp_path):
    uri = crafted(tmp_path, {"keras": {"data": "data", "save_exported_model": True, "keras_version": "3.15.1"}})
    with pytest.raises(PipelineError, match=r"a Keras model saved as a TensorFlow SavedModel"):
        loading.load_keras(uri)


@pytest.mark.parametrize("path", ["/etc/network.keras", "../../elsewhere/network.keras", "C:/x/network.keras"])
def test_an_artifact_path_outside_the_model_is_refused(tmp_path, path):
    flavors = {"python_function": {"loader_module": "mlflow.pyfunc.loaders.code_model",
                                   "artifacts": {serving.KERAS_ARTIFACT: {"path": path}}}}  # fmt: skip
    uri = crafted(tmp_path, flavors, {"image_size": 32, "classes": list(CLASSES)})
    with pytest.raises(PipelineError, match=r"its MLmodel names .*, outside the model's directory"):
        loading.load_keras(uri)
    assert "outside the model's directory" in loading.pipeline_model_problem(mlflow.models.get_model_info(uri))


def test_only_the_pipelines_own_layout_is_registered(tmp_path):
    keras_only = mlflow.models.get_model_info(crafted(tmp_path, {"keras": {"data": "data"}}))
    assert loading.pipeline_model_problem(keras_only).startswith("its flavors are ['keras']")


def test_evaluate_follows_best_run_id_only_into_a_train_experiment(store):
    with mlflow.start_run(experiment_id=mlflow.create_experiment("anything")) as elsewhere:
        pass
    with mlflow.start_run(experiment_id=mlflow.create_experiment("train/mine")) as parent:
        mlflow.set_tag("best_run_id", elsewhere.info.run_id)
    with pytest.raises(PipelineError, match=r"is in experiment 'anything', not a train/ experiment"):
        registration.resolve_model_run(parent.info.run_id)


# --- Credentials --------------------------------------------------------------------------------


def test_credentials_are_redacted_in_every_printed_uri():
    text = "at https://alice:tok3n@mlflow.example.com/api and http://bob@h:5000, not file:///tmp/x@y"
    assert errors.redact(text) == "at https://***@mlflow.example.com/api and http://***@h:5000, not file:///tmp/x@y"


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET: a redirect to ``self.server.redirect_to`` if set, else 200; records headers."""

    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.seen.append(dict(self.headers))
        target = getattr(self.server, "redirect_to", None)
        target = None if self.path.startswith("/moved") else target
        self.send_response(302 if target else 200)
        if target:
            self.send_header("Location", target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve() -> http.server.HTTPServer:
    server = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_server_probe_never_sends_credentials_to_another_origin(monkeypatch):
    other, first = serve(), serve()
    first.redirect_to = f"http://127.0.0.1:{other.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "canary-token-3c1d")
    try:
        tracking.check_server(f"http://127.0.0.1:{first.server_port}")
    finally:
        first.shutdown(), other.shutdown()
    assert any(h.get("Authorization") == "Bearer canary-token-3c1d" for h in first.seen)
    assert other.seen and not any("Authorization" in h for h in other.seen)

    same = serve()
    same.redirect_to = f"http://127.0.0.1:{same.server_port}/moved"  # same origin: credentials kept
    try:
        tracking.check_server(f"http://127.0.0.1:{same.server_port}")
    finally:
        same.shutdown()
    assert sum(h.get("Authorization") == "Bearer canary-token-3c1d" for h in same.seen) >= 2


def test_dependency_floors_hold_on_every_platform():
    lines = [line.split("#")[0].strip() for line in (PROJECT_DIR / "requirements.txt").read_text().splitlines()]
    pins = {re.split(r"[<>=!;\s]", line, maxsplit=1)[0]: line for line in lines if line}
    assert pins["keras"] == "keras>=3.12,<4" and pins["pillow"] == "pillow>=10.3"  # no platform marker
    assert pins["mlflow"] == "mlflow>=3.17,<4"


# --- The decoder's bounds --------------------------------------------------------------------


def test_a_very_wide_image_is_refused_from_its_header():
    wide = encode(Image.new("L", (67_000_000, 1)), "PNG", optimize=True)  # 65 KB, under the pixel cap
    with pytest.raises(ImageError, match=r"^67000000x1 has a side over 16,384 pixels"):
        decode_gray(wide)


@pytest.mark.slow
def test_the_test_images_resize_exactly_as_before_the_shrink_at_every_trained_size():
    """Every ELPV test cell, at every size a set trains at: ``resize`` equals the antialiased Keras
    resize of the decoded image, which is all it did before large frames were shrunk first."""
    import keras

    plan = elpv.elpv_split(elpv.elpv_labels(), CLASSES)
    sizes = sorted({hp.image_size for hp in load_config().hparam_sets.values()})
    for source in plan[plan["split"] == "test"]["source"]:
        gray = decode_gray(Path(source))
        for size in sizes:
            before = keras.ops.convert_to_numpy(
                keras.ops.image.resize(gray.astype("float32"), (size, size), **serving.RESIZE)
            )
            assert np.array_equal(serving.resize(gray, size), before), (source, size)


def test_a_frame_far_larger_than_the_input_is_shrunk_before_the_resize():
    frame = np.random.default_rng(0).integers(0, 256, (8192, 4096, 1), dtype=np.uint8)
    shrunk = serving.shrink(frame, 160)
    assert shrunk.shape == (-(-8192 // 12), -(-4096 // 6), 1)  # whole factors (12, 6): 4x to 8x the input
    small = frame[:600, :600]  # under 4x the input: left as it is
    assert serving.shrink(small, 160) is small
    out = serving.resize(frame, 160)
    assert out.shape == (160, 160, 1) and abs(float(out.mean()) - float(frame.mean())) < 1.0
