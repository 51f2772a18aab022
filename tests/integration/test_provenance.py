"""A registered version runs only code this project released: evaluate and promote recompute the check
of a model's files (steps/served/provenance.py) and refuse, in one line and registering nothing, every door
an author of a train/ run could open: their own code, read_paths, a code folder, their own
requirements, a forged or missing verification tag. Each attack is a real model of the pipeline,
copied and changed as its author could, and logged in a train/ experiment.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import world_config
from helpers import use_copy_of
from steps import evaluate, promote
from steps.core import cli, contract
from steps.core.errors import MODEL, ModelError
from steps.mlflow_io.registration import register_and_promote
from steps.mlflow_io.registry import alias_version
from steps.served import provenance, serving

pytestmark = pytest.mark.model  # on prod_world: a trained, registered model


def test_the_released_code_is_in_the_allow_list():
    digest = hashlib.sha256(Path(serving.__file__).read_bytes()).hexdigest()
    assert digest in provenance.released_digests()


@pytest.fixture
def world(prod_world, tmp_path, monkeypatch):
    """A copy of prod_world's store, its data, the config evaluate uses, and the real model's files."""
    db, train_run = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    data = db.parent / "data"
    config = world_config(data, tmp_path, **{"evaluate.threshold": "0.0"})
    best = mlflow.MlflowClient().get_run(train_run).data.tags[contract.TAG_BEST_RUN_ID]
    model = Path(mlflow.artifacts.download_artifacts(f"runs:/{best}/{contract.MODEL_ARTIFACT}", dst_path=tmp_path))
    return config, model, best


def forged(model: Path, tmp_path: Path, change) -> str:
    """A copy of ``model`` changed by ``change(folder)``, logged as a FINISHED run of a train/
    experiment, as anyone who can log there could; the run's ID."""
    folder = tmp_path / "forged" / contract.MODEL_ARTIFACT
    shutil.rmtree(folder.parent, ignore_errors=True)
    shutil.copytree(model, folder)
    # A model of its own, not a pointer back to the one it was copied from (as log_model would make it).
    edit_mlmodel(folder, lambda pyfunc: None, drop=("model_id", "model_uuid", "artifact_path"))
    change(folder)
    client = mlflow.MlflowClient()
    name = contract.experiment_name(contract.STAGE_TRAIN, "someone")
    found = client.get_experiment_by_name(name)
    with mlflow.start_run(experiment_id=found.experiment_id if found else client.create_experiment(name)) as run:
        mlflow.log_artifacts(str(folder), contract.MODEL_ARTIFACT)
    return run.info.run_id


def edit_mlmodel(folder: Path, edit, drop=()) -> None:
    path = folder / "MLmodel"
    mlmodel = yaml.safe_load(path.read_text())
    edit(mlmodel["flavors"]["python_function"])
    for key in drop:
        mlmodel.pop(key, None)
    path.write_text(yaml.safe_dump(mlmodel))


def one_more_line(folder: Path) -> None:
    code = folder / "serving.py"
    code.write_text(code.read_text() + "\nimport os\nos.system('touch /tmp/pwned')\n")


def reads_paths(folder: Path) -> None:
    edit_mlmodel(folder, lambda pyfunc: pyfunc["config"].update(read_paths=True))


def code_folder(folder: Path) -> None:
    (folder / "code" / "PIL").mkdir(parents=True)
    (folder / "code" / "PIL" / "__init__.py").write_text("import os\n")
    edit_mlmodel(folder, lambda pyfunc: pyfunc.update(code="code"))


def own_requirement(folder: Path) -> None:
    path = folder / "requirements.txt"
    path.write_text(path.read_text() + "\nhelpful-utils==1.0\n")


def build_dependency(folder: Path) -> None:
    path = folder / "python_env.yaml"
    env = yaml.safe_load(path.read_text())
    env["build_dependencies"].append("helpful-utils")
    path.write_text(yaml.safe_dump(env))


ATTACKS = {
    "own code": (one_more_line, "is no released version of steps/served/serving.py"),
    "read_paths": (reads_paths, "its model config differs from what train writes: read_paths=True"),
    "code folder": (code_folder, "holds files train never writes: code"),
    "requirements": (own_requirement, "its requirements.txt has 'helpful-utils==1.0'"),
    "build dependencies": (build_dependency, "its python_env.yaml installs more than requirements.txt"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_evaluate_refuses_a_model_its_author_changed_and_registers_nothing(world, tmp_path, capsys, attack):
    config, model, _ = world
    change, reason = ATTACKS[attack]
    run_id = forged(model, tmp_path, change)
    with pytest.raises(SystemExit) as stop:
        cli.main(evaluate.evaluate, "", evaluate.OVERRIDES, argv=[f"--run_id={run_id}"], own=("run_id",))
    printed = capsys.readouterr().err.strip()
    err = printed.splitlines()[-1]
    assert stop.value.code == MODEL.exit_code == 3, printed[-3000:]
    assert err.startswith(f"error: run {run_id}'s model is refused, nothing was registered: ")
    assert reason in err and "\n" not in err
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{config.registry.production}'")
    assert [v.version for v in versions] == [1]  # prod_world's own, nothing new


def test_a_code_folder_alone_is_refused_by_the_check_of_files(world, tmp_path):
    """The MLmodel key by itself (no extra file), which MLflow would put on sys.path."""
    _, model, _ = world
    mlmodel, files = provenance.read_model_files(str(model))
    mlmodel["flavors"]["python_function"]["code"] = "artifacts"
    with pytest.raises(ModelError, match=r"^its MLmodel names a code folder \('artifacts'\)"):
        provenance.check_files(mlmodel, files, provenance.released_digests())


def test_evaluate_records_the_verified_digest_on_the_version(world):
    config, model, _ = world
    version = mlflow.MlflowClient().get_model_version(config.registry.production, "1")
    code = hashlib.sha256((model / "serving.py").read_bytes()).hexdigest()
    assert version.tags[contract.VERSION_TAG_CODE_SHA256] == code


def hand_registered(config, run_id: str, **tags: str) -> str:
    """A version of the production model registered by hand from ``run_id``'s model, scored by its author."""
    client = mlflow.MlflowClient()
    found = client.create_model_version(
        config.registry.production, f"runs:/{run_id}/{contract.MODEL_ARTIFACT}", run_id=run_id,
        tags={"acc": "0.99", "test_digest": "d" * 16, **tags},
    )  # fmt: skip
    return str(found.version)


def test_promote_refuses_a_forged_tag_and_a_version_whose_files_were_changed(world, tmp_path, capsys):
    config, model, best = world
    released = sorted(provenance.released_digests())[0]
    evil = hand_registered(config, forged(model, tmp_path, one_more_line), code_sha256=released)
    with pytest.raises(ModelError, match=rf"^Production_Reg version {evil} is refused: its code serving.py"):
        promote.promote(config, evil, "it scores 0.99")
    honest_files = hand_registered(config, best, code_sha256=released)  # the real files, a tag that lies
    with pytest.raises(ModelError, match=rf"version {honest_files}'s code_sha256 tag \(\w+\.\.\.\) does not match"):
        promote.promote(config, honest_files, "it scores 0.99")
    assert alias_version(config.registry.production, config.registry.alias) == "1"


def test_versions_registered_before_the_check_are_verified_once_and_can_then_be_promoted(world, capsys):
    config, _, best = world
    client = mlflow.MlflowClient()
    older = hand_registered(config, best)  # no code_sha256: registered before evaluate checked files
    with pytest.raises(ModelError, match=rf"version {older} has no code_sha256 tag .*make verify-registry"):
        promote.promote(config, older, "roll back to it")
    outcome = promote.verify_registered(config)
    assert set(outcome) == {"1", older} and not any(v.startswith("refused") for v in outcome.values())
    assert client.get_model_version(config.registry.production, older).tags[contract.VERSION_TAG_CODE_SHA256]
    promote.promote(config, older, "roll back to it")
    assert alias_version(config.registry.production, config.registry.alias) == older


def test_the_promotion_rule_passes_over_a_hand_registered_version_whose_files_are_refused(world, tmp_path):
    """Its author scored it 0.99 on the very test set; evaluate's rule checks its files before
    handing it prod, and the honest newcomer takes prod instead."""
    config, model, _ = world
    client = mlflow.MlflowClient()
    evil = hand_registered(config, forged(model, tmp_path, reads_paths))
    check = functools.partial(provenance.check_version, client, config.registry.production)
    outcome = register_and_promote(client, config, "file:///nowhere", 0.7, "d" * 16, {}, verify=check)
    assert outcome.promoted and alias_version(config.registry.production, config.registry.alias) == outcome.version
    assert outcome.version != evil


def test_bytecode_python_wrote_beside_the_code_passes_and_bytecode_of_other_code_is_refused(world):
    import py_compile

    _, model, _ = world
    cache = model / "__pycache__" / f"serving.{sys.implementation.cache_tag}.pyc"
    py_compile.compile(str(model / "serving.py"), cfile=str(cache), doraise=True)  # as a load in place writes it
    assert provenance.verify(str(model)) in provenance.released_digests()
    other = model.parent / "other.py"
    other.write_text((model / "serving.py").read_text() + "\nimport os\n")
    py_compile.compile(str(other), cfile=str(cache), doraise=True)
    with pytest.raises(
        ModelError, match=r"its __pycache__/serving\.cpython-\d+\.pyc is not the bytecode of its serving.py"
    ):
        provenance.verify(str(model))
