"""main reuses finished stages: the same code, parameters and data reuse train and evaluate; any
change reruns the stage it touches and every stage after it.

main's own logic in-process (``helpers.in_process_stages``) on one set of the tiny data: a first
main builds a store once, and each test runs one more main on its own copy. The same reuse through
`mlflow run`, timed, is in tests/e2e/test_e2e.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from helpers import building_store, in_process_stages, use_copy_of
from steps import evaluate, main
from steps.core import contract, parameters
from steps.core.config import PROJECT_DIR
from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.mlflow_io import fingerprint

pytestmark = [pytest.mark.model, pytest.mark.slow]

TRAIN, EVAL, INFER = contract.STAGE_TRAIN, contract.STAGE_EVAL, contract.STAGE_INFER


def pipeline_config(data: Path, tmp_path: Path, **overrides: str):
    values = {"data.dir": str(data), "train.image_size": "32", "train.epochs": "1", "train.hparams": "small",
              "train.exports": "none",
              "evaluate.threshold": "0.0", "experiment": "reuse", "infer.output": str(tmp_path / "p.csv")}  # fmt: skip
    return load_config({**values, **overrides})


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_data):
    """A store after one main on its own copy of the tiny data: (db path, data folder, main's tags)."""
    root = tmp_path_factory.mktemp("reuse")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    patch = pytest.MonkeyPatch()
    in_process_stages(patch)
    try:
        with building_store(root) as db:
            tags = main.main(pipeline_config(data, root))
    finally:
        patch.undo()
    return db, data, tags


@pytest.fixture
def again(first, tmp_path, monkeypatch):
    """Run main once more on a copy of the first store: ``again(**overrides, reuse=, rerun=)`` gives
    (main's tags, the stages that ran)."""
    db, data, _ = first
    use_copy_of(db, tmp_path, monkeypatch)
    calls: list = []
    in_process_stages(monkeypatch, calls)

    def run(data_dir: Path = data, reuse: str = "", rerun: str = "", **overrides: str):
        before = len(calls)
        tags = main.main(pipeline_config(data_dir, tmp_path, **overrides), reuse=reuse, rerun=rerun)
        return tags, [stage for stage, _, _ in calls[before:]]  # this main's stages alone

    return run


def versions() -> list[str]:
    return sorted(str(v.version) for v in mlflow.MlflowClient().search_model_versions("name = 'Production_Reg'"))


def test_an_identical_main_reuses_train_and_evaluate_and_registers_nothing(first, again):
    tags, ran = again()
    assert ran == [INFER]  # infer's input is usually new: it runs again unless reuse=all
    for key in (contract.TAG_TRAIN_RUN_ID, contract.TAG_EVAL_RUN_ID, contract.TAG_REGISTERED_VERSION):
        assert tags[key] == first[2][key], key
    assert tags[contract.reused_from_tag(TRAIN)].startswith(first[2][contract.TAG_TRAIN_RUN_ID] + " (")
    assert tags[contract.reused_from_tag(EVAL)].startswith(first[2][contract.TAG_EVAL_RUN_ID] + " (")
    assert versions() == ["1"]
    assert str(mlflow.MlflowClient().get_model_version_by_alias("Production_Reg", "prod").version) == "1"


def test_reuse_all_reuses_an_identical_infer_too(first, again):
    assert again()[1] == [INFER]  # the first infer with this output: it runs
    tags, ran = again(reuse="all")
    assert ran == [] and contract.reused_from_tag(INFER) in tags


def test_reuse_all_runs_infer_again_when_its_output_is_gone_or_changed(again, tmp_path):
    assert again()[1] == [INFER]
    output = tmp_path / "p.csv"
    output.unlink()
    assert again(reuse="all")[1] == [INFER] and output.is_file()  # not "reusing infer run ..." with no file
    output.write_text(output.read_text() + "edited by hand\n")
    assert again(reuse="all")[1] == [INFER]
    assert again(reuse="all")[1] == []  # intact: reused


def test_after_a_branch_evaluated_without_promoting_the_merged_main_evaluates_and_promotes(again):
    client = mlflow.MlflowClient()
    tags, ran = again(**{"train.epochs": "2", "evaluate.promote": "false"})  # the branch's main
    branch = mlflow.get_run(tags[contract.TAG_EVAL_RUN_ID]).data.tags
    assert ran == [TRAIN, EVAL, INFER] and branch["promoted"] == "false"
    assert branch["promotion_reason"].startswith("evaluate.promote is false")
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == "1"
    tags, ran = again(**{"train.epochs": "2"})  # the default branch after the merge: same code and data
    assert ran == [EVAL, INFER]  # train reused; evaluate not, since its promote parameter differs
    merged = mlflow.get_run(tags[contract.TAG_EVAL_RUN_ID]).data.tags
    version = client.get_model_version("Production_Reg", merged["registered_version"]).tags
    champion = client.get_model_version("Production_Reg", "1").tags
    assert "prod_ineligible" not in version  # the rule decided, by the numbers
    assert merged["promoted"] == str(float(version["acc"]) > float(champion["acc"])).lower(), merged["promotion_reason"]


def test_another_epoch_count_reruns_train_and_what_follows(again):
    tags, ran = again(**{"train.epochs": "2"})
    assert ran == [TRAIN, EVAL, INFER] and versions() == ["1", "2"]


def test_a_changed_test_image_reruns_evaluate_but_not_train(first, again, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(first[1], data)  # another folder, the same images: train is still the same
    image = sorted((data / "test" / "ok_front").glob("*.png"))[0]
    with Image.open(image) as cell:
        cell.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)  # new content, same name and size
    tags, ran = again(data_dir=data)
    assert ran == [EVAL, INFER]
    assert tags[contract.TAG_TRAIN_RUN_ID] == first[2][contract.TAG_TRAIN_RUN_ID]


def test_a_change_to_the_code_reruns_everything(again, monkeypatch):
    monkeypatch.setattr(fingerprint, "code_digest", lambda root=PROJECT_DIR: "an edited steps/ file")
    _, ran = again()
    assert ran == [TRAIN, EVAL, INFER]


def test_reuse_false_and_rerun_say_what_runs_again(again):
    assert again(reuse="false")[1] == [TRAIN, EVAL, INFER]
    assert again(rerun="evaluate")[1] == [EVAL, INFER]


def test_a_main_stopped_during_evaluate_is_rerun_from_evaluate(first, again, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM, where evaluate registers

    with monkeypatch.context() as during:
        during.setattr(evaluate, "register_and_promote", killed)
        with pytest.raises(PipelineError, match="the evaluate stage failed"):
            again(**{"evaluate.threshold": "0.5"})
    tags, ran = again(**{"evaluate.threshold": "0.5"})
    assert ran == [EVAL, INFER]  # prod is the first main's version: infer runs

    assert tags[contract.TAG_TRAIN_RUN_ID] == first[2][contract.TAG_TRAIN_RUN_ID]


def test_a_failed_or_reaped_run_with_the_same_fingerprint_is_never_reused(first, again):
    client = mlflow.MlflowClient()
    client.set_terminated(first[2][contract.TAG_TRAIN_RUN_ID], "FAILED")
    assert again()[1] == [TRAIN, EVAL, INFER]


def test_a_train_run_whose_model_does_not_load_is_not_reused(first, again, monkeypatch):
    best = first[2][contract.TAG_BEST_RUN_ID]
    real = mlflow.pyfunc.load_model

    def lost(uri, *args, **kwargs):  # the first store's artifacts are shared by every copy: not deleted
        if best in uri:
            raise OSError(f"No such file or directory: {uri}")
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", lost)
    assert again()[1] == [TRAIN, EVAL, INFER]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reuse", "rerun", "message"),
    [
        ("maybe", "", "parameter reuse: expected one of true, false, all, got 'maybe'"),
        ("", "train,deploy", "parameter rerun: expected names among train, evaluate, infer, got deploy"),
    ],
)
def test_bad_reuse_parameters_fail_with_one_clear_error(reuse, rerun, message):
    with pytest.raises(PipelineError) as err:
        parameters.check_choices("main", {"reuse": reuse})
        main.reuse_plan(reuse, rerun)
    assert str(err.value) == message


@pytest.mark.unit
def test_the_plan_reruns_a_named_stage_and_every_stage_after_it():
    assert main.reuse_plan("", "") == {TRAIN, EVAL}
    assert main.reuse_plan("all", "") == {TRAIN, EVAL, INFER}
    assert main.reuse_plan("all", "evaluate") == {TRAIN}
    assert main.reuse_plan("true", "train") == set()
    assert main.reuse_plan("false", "") == set()


@pytest.mark.unit
def test_the_code_digest_follows_the_code_and_conf_and_not_the_docs_or_tests(tmp_path):
    for name in (*fingerprint.CODE, "README.md", "tests"):
        source = PROJECT_DIR / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    before = fingerprint.code_digest(tmp_path)
    (tmp_path / "README.md").write_text("edited")
    (tmp_path / "tests" / "test_reuse.py").write_text("# edited")
    assert fingerprint.code_digest(tmp_path) == before
    for edited in ("steps/train.py", "conf/hparams.yaml", "requirements.txt", "MLproject"):
        path = tmp_path / edited
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert fingerprint.code_digest(tmp_path) != before, edited
        path.write_bytes(original)
    assert fingerprint.code_digest(tmp_path) == before  # content, not modification times


@pytest.mark.unit
def test_the_fingerprint_ignores_where_the_data_is_but_not_what_it_is():
    params = {"data_dir": "/a", "epochs": "1"}
    same = fingerprint.fingerprint("train", params, "code", "data")
    assert fingerprint.fingerprint("train", {**params, "data_dir": "/b"}, "code", "data") == same
    assert fingerprint.fingerprint("train", params, "code", "other data") != same
    assert fingerprint.fingerprint("train", {**params, "epochs": "2"}, "code", "data") != same
    assert fingerprint.fingerprint("evaluate", params, "code", "data") != same
