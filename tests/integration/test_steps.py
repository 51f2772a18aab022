"""Model tier: the stage functions themselves, in-process, on the tiny real-image set.

Training runs once per module; every test then works on its own copy of that SQLite store.
"""

from __future__ import annotations

import csv
import shutil

import mlflow
import pytest
import tensorflow as tf

from conftest import SCRATCH_SETS
from helpers import building_store, in_process_stages, use_copy_of, without_memory
from steps import evaluate, infer, main
from steps.core import cli, contract
from steps.core.errors import PipelineError
from steps.core.loader import load_config
from steps.network import statistics
from steps.network.model import resolve_precision
from steps.train import train

pytestmark = pytest.mark.model


def tiny(tiny_data, **overrides: str):
    # No exports: tests/integration/test_exports.py checks them, on conftest's prod_world.
    values = {"data.dir": str(tiny_data), "train.image_size": "32", "train.epochs": "1", "experiment": "test",
              "train.hparams": SCRATCH_SETS, "train.exports": "none"}  # fmt: skip
    return load_config({**values, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A store holding one finished train run: (db path, parent run ID)."""
    with building_store(tmp_path_factory.mktemp("trained")) as db:
        return db, train(tiny(tiny_data))


@pytest.fixture
def trained_store(trained, tmp_path, monkeypatch):
    db, parent = trained
    use_copy_of(db, tmp_path, monkeypatch)
    return parent


def test_train_logs_three_children_and_names_the_best(trained_store):
    client = mlflow.MlflowClient()
    parent = client.get_run(trained_store)
    assert parent.info.status == "FINISHED"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == "train/test"
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags[contract.TAG_HPARAM_SET] for c in children) == ["medium", "small", "wide"]
    for child in children:
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "learning_rate"):
            assert len(client.get_metric_history(child.info.run_id, metric)) == 1  # one per epoch
        assert child.data.params["epochs"] == "1"  # logged params come back as strings
        # auto: what this machine's CPU resolves it to (bfloat16 where it is native, else float32)
        assert child.data.params["precision"] == resolve_precision("auto")
        # The kept epoch's validation scores are the epoch's own, measured again on the kept weights.
        assert child.data.metrics["best_epoch"] == 1
        assert child.data.metrics["best_val_accuracy"] == pytest.approx(child.data.metrics["val_accuracy"])
        assert child.data.metrics["best_val_loss"] == pytest.approx(child.data.metrics["val_loss"], rel=1e-4)
        assert child.data.metrics["flops_per_image"] > 0
        assert child.data.tags["versions.tensorflow"] == tf.__version__
        info = mlflow.models.get_model_info(f"runs:/{child.info.run_id}/model")
        assert info.signature is not None
        # The cut-off tuned on validation travels with the model.
        assert info.metadata["decision_threshold"] == child.data.metrics["decision_threshold"]
        assert 0.0 <= info.metadata["decision_threshold"] <= 1.0
        # Tuning never picks a cut-off that scores worse on validation than 0.5 does.
        assert child.data.metrics["val_objective_at_cutoff"] >= child.data.metrics["val_objective_at_0.5"]
    best = max(children, key=lambda c: (c.data.metrics["best_val_accuracy"], -c.data.metrics["best_val_loss"]))
    assert parent.data.tags[contract.TAG_BEST_RUN_ID] == best.info.run_id
    assert parent.data.metrics[contract.METRIC_BEST_VAL_ACCURACY] == best.data.metrics["best_val_accuracy"]
    assert {"versions.python", "versions.keras", "versions.mlflow"} <= set(parent.data.tags)
    digests = {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs}
    assert digests["train"] == parent.data.tags[contract.TAG_DATA_DIGEST] and "val" in digests
    assert parent.data.params["conf.train.image_size"] == "32"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "train_manifest.csv", "val_manifest.csv"} <= artifacts


def test_evaluate_registers_by_threshold_and_moves_prod_only_in_production(trained_store, tiny_data, capsys):
    client = mlflow.MlflowClient()
    eval_id = evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "0.0"}), trained_store)
    run = client.get_run(eval_id)
    assert client.get_experiment(run.info.experiment_id).name == "eval/test"
    assert run.data.tags[contract.TAG_REGISTERED_MODEL] == "Production_Reg"
    assert run.data.tags[contract.TAG_PROMOTED] == "true"
    version = client.get_model_version("Production_Reg", run.data.tags[contract.TAG_REGISTERED_VERSION])
    assert float(version.tags["acc"]) == run.data.metrics["test_accuracy"]
    assert version.tags["eval_run_id"] == eval_id
    assert version.tags["source_run_id"] == run.data.tags["source_run_id"]
    assert version.tags["test_digest"] == run.inputs.dataset_inputs[0].dataset.digest
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == str(version.version)
    for metric in ("precision", "recall", "f1", "roc_auc", "balanced_accuracy", "tuned_test_accuracy", "tuned_recall"):
        assert 0.0 <= run.data.metrics[metric] <= 1.0
    cutoff = mlflow.models.get_model_info(f"runs:/{run.data.tags['source_run_id']}/model").metadata[
        "decision_threshold"
    ]
    assert run.data.metrics["decision_threshold"] == cutoff and version.tags["decision_threshold"] == repr(cutoff)
    assert {"metrics.json", "confusion_matrix.png", "roc_pr_curves.png", "misclassified.png", "test_manifest.csv"} <= {
        a.path for a in client.list_artifacts(eval_id)
    }
    report = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/metrics.json")
    assert report["promoted"] is True and report["promotion_reason"] == run.data.tags["promotion_reason"]
    assert report["tuned_f1"] == run.data.metrics["tuned_f1"] and "0.500" in report["confusion_matrices"]
    assert sum(map(sum, report["confusion_matrices"]["0.500"])) == report["n_test"]

    # The same model held to an unreachable bar goes to Testing_Reg and prod stays put.
    eval_id = evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "1.0"}), trained_store)
    run = client.get_run(eval_id)
    assert run.data.tags[contract.TAG_REGISTERED_MODEL] == "Testing_Reg"
    assert run.data.tags[contract.TAG_PROMOTED] == "false"
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == str(version.version)
    stays = f"-> Testing_Reg version 1; Production_Reg@prod stays on version {version.version}"
    assert stays in capsys.readouterr().out


def test_evaluate_keeps_intervals_predictions_a_paired_comparison_and_a_model_card(trained_store, tiny_data):
    client = mlflow.MlflowClient()
    cfg = tiny(tiny_data, **{"evaluate.threshold": "0.0"})
    first = client.get_run(evaluate.evaluate(cfg, trained_store))
    second = client.get_run(evaluate.evaluate(cfg, trained_store))  # the same model again: version 2
    digest = first.inputs.dataset_inputs[0].dataset.digest
    metrics = second.data.metrics
    for name in statistics.FIGURES:  # every figure, at 0.5 and at the tuned cut-off, with its interval
        for key in (name, contract.TUNED_PREFIX + name):
            assert metrics[key + "_ci_low"] <= metrics[key] <= metrics[key + "_ci_high"], key
    report = mlflow.artifacts.load_dict(f"{second.info.artifact_uri}/metrics.json")
    assert report["test_accuracy_ci_low"] == metrics["test_accuracy_ci_low"]
    # Per-image predictions, keyed by the test set, pointed at by each version.
    v1, v2 = (client.get_model_version("Production_Reg", v) for v in ("1", "2"))
    rows = mlflow.artifacts.load_text(v2.tags[f"predictions.{digest}"]).splitlines()
    assert rows[0] == "file,label,defect_probability" and len(rows) == 1 + int(
        metrics["n_test_good"] + metrics["n_test_defect"]
    )
    assert v1.tags[f"predictions.{digest}"].startswith(
        f"runs:/{first.info.run_id}/predictions/"
    )  # read back, not rescored
    # The paired comparison with the holder: the same model agrees on every image.
    assert second.data.tags[contract.TAG_PAIRED_WITH] == "1" and v2.tags[contract.TAG_PAIRED_WITH] == "1"
    assert metrics[contract.METRIC_PAIRED_AGREEMENT] == 1.0 and metrics[contract.METRIC_PAIRED_P_VALUE] == 1.0
    assert metrics[contract.METRIC_PAIRED_CHALLENGER_ONLY] == metrics[contract.METRIC_PAIRED_CHAMPION_ONLY] == 0
    # What people read in the UI: a model card, the registered model's paragraph, names, the experiment kind.
    assert "| accuracy |" in v2.description and "McNemar p = 1" in v2.description and digest in v2.description
    assert "alias `prod`" in client.get_registered_model("Production_Reg").description
    assert second.data.tags["mlflow.runName"].endswith("-> Production_Reg v2")
    for experiment in client.search_experiments(filter_string="name LIKE '%/test'"):
        assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development", experiment.name
    parent = client.get_run(trained_store)
    assert parent.data.tags["mlflow.runName"] == f"train {SCRATCH_SETS.replace(',', ', ')}"


def test_a_champion_from_another_test_set_is_rescored_on_this_one(trained_store, tiny_data, tmp_path, capsys):
    client = mlflow.MlflowClient()
    first = mlflow.get_run(evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "0.0"}), trained_store))
    champion = first.data.tags["registered_version"]

    # The test set changes: one image fewer, so another digest.
    changed = tmp_path / "data"
    shutil.copytree(tiny_data, changed)
    sorted((changed / "test" / "def_front").iterdir())[0].unlink()
    run = mlflow.get_run(evaluate.evaluate(tiny(changed, **{"evaluate.threshold": "0.0"}), trained_store))
    new_digest = run.inputs.dataset_inputs[0].dataset.digest
    assert new_digest != first.inputs.dataset_inputs[0].dataset.digest

    # The champion was scored on the new test set first, and that score is what it was compared on.
    tags = client.get_model_version("Production_Reg", champion).tags
    assert tags["test_digest"] == new_digest and tags[f"acc.{new_digest}"] == tags["acc"]
    assert tags[f"acc.{first.inputs.dataset_inputs[0].dataset.digest}"] == repr(first.data.metrics["test_accuracy"])
    assert run.data.tags["champion_rescored"].startswith(f"version {champion}: acc {tags['acc']} on test set")
    assert run.data.tags["champion_version"] == champion
    assert run.data.metrics["champion_test_accuracy"] == float(tags["acc"])
    # Same model, same images: the same score, so the tie keeps the champion.
    assert run.data.metrics["test_accuracy"] == float(tags["acc"])
    assert run.data.tags["promoted"] == "false" and "a tie keeps the champion" in run.data.tags["promotion_reason"]
    assert "not promoted: version 2 (acc" in capsys.readouterr().out


def test_a_hand_registered_prod_that_cannot_be_scored_is_replaced_without_a_crash(trained_store, tiny_data):
    client = mlflow.MlflowClient()
    client.create_registered_model("Production_Reg")
    client.create_model_version("Production_Reg", "file:///nowhere", tags={"acc": "0.99"})  # no test_digest
    client.set_registered_model_alias("Production_Reg", "prod", "1")
    run = mlflow.get_run(evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "0.0"}), trained_store))
    assert run.data.tags["champion_rescored"] == (
        "version 1: not a model of this pipeline (registered by hand (no eval_run_id tag))"
    )
    assert run.data.tags["promoted"] == "true" and "prod version 1 has no score" in run.data.tags["promotion_reason"]
    assert str(client.get_model_version_by_alias("Production_Reg", "prod").version) == "2"


def test_evaluate_of_a_train_parent_scores_its_best_run(trained_store, tiny_data):
    eval_id = evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "0.0"}), trained_store)
    best = mlflow.get_run(trained_store).data.tags[contract.TAG_BEST_RUN_ID]
    assert mlflow.get_run(eval_id).data.tags[contract.TAG_SOURCE_RUN_ID] == best


def test_evaluate_with_an_unknown_run_id_says_what_to_run_first(trained_store, tiny_data, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            evaluate.evaluate,
            "",
            evaluate.OVERRIDES,
            argv=["--run_id", "0123abc" * 4 + "0123", "--data_dir", str(tiny_data)],
            own=("run_id",),
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run '{'0123abc' * 4}0123' does not exist in sqlite:///")
    assert "mlflow run . -e train" in err
    assert len(err.splitlines()) == 1


def test_evaluate_of_a_run_without_a_model_says_so(trained_store, tiny_data):
    with mlflow.start_run(experiment_id=mlflow.create_experiment("train/empty")) as empty:
        pass
    with pytest.raises(PipelineError, match=f"run '{empty.info.run_id}' has no logged model 'model'.*-e train"):
        evaluate.evaluate(tiny(tiny_data), empty.info.run_id)
    assert mlflow.MlflowClient().search_registered_models() == []  # nothing half-registered


def test_infer_before_any_prod_alias_says_what_to_run_first(trained_store, tiny_data):
    with pytest.raises(
        PipelineError, match=r"no version of 'Production_Reg' has the alias 'prod' yet; run `mlflow run . -e main`"
    ):
        infer.infer(tiny(tiny_data))


def test_infer_writes_one_row_per_image_and_survives_a_bad_file(trained_store, tiny_data, tmp_path):
    evaluate.evaluate(tiny(tiny_data, **{"evaluate.threshold": "0.0"}), trained_store)
    images = tmp_path / "incoming"
    shutil.copytree(tiny_data / "test", images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    output = tmp_path / "out" / "predictions.csv"
    with pytest.raises(infer.ImagesFailed, match=r"^1 of \d+ images could not be read; every row is in"):
        infer.infer(tiny(tiny_data, **{"infer.input": str(images), "infer.output": str(output)}))
    (run_id,) = [r.info.run_id for r in mlflow.search_runs(experiment_names=["infer/test"], output_format="list")]

    rows = list(csv.DictReader(output.open()))
    n_images = len(list(images.rglob("*.png")))
    assert len(rows) == n_images
    broken = [r for r in rows if r["path"].endswith("broken.png")]
    assert broken[0]["error"] and broken[0]["predicted_class"] == ""
    good = [r for r in rows if not r["error"]]
    assert {r["predicted_class"] for r in good} <= {"ok_front", "def_front"}
    assert all(0.0 <= float(r["defect_probability"]) <= 1.0 for r in good)
    cutoff = mlflow.models.get_model_info("models:/Production_Reg/1").metadata["decision_threshold"]
    assert all(float(r["decision_threshold"]) == pytest.approx(cutoff) for r in good)
    assert all((r["predicted_class"] == "def_front") == (float(r["defect_probability"]) >= cutoff) for r in good)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"  # the work was done; only the exit status tells of the bad file
    assert without_memory(run.data.metrics) == {
        "n_images": n_images,
        "n_scored": n_images - 1,
        "n_errors": 1,
        "n_defect": sum(r["predicted_class"] == "def_front" for r in rows),
        "n_review": n_images - 1,  # every scored image: fewer than review_top
    }
    assert run.data.tags[contract.TAG_MODEL_URI] == "models:/Production_Reg@prod"
    assert run.data.tags[contract.TAG_MODEL_VERSION] == "1"
    assert "predictions.csv" in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}


@pytest.mark.slow  # a whole main in-process: 7 s on 2 cores
def test_main_with_no_model_over_the_bar_registers_in_testing_and_skips_infer(store, tiny_data, monkeypatch):
    """main's own logic, in-process: each stage runs from the command line main builds for it, in a
    thread of its own (MLflow's active run is per thread, as it is per process under mlflow run)."""
    calls: list = []
    in_process_stages(monkeypatch, calls)
    # 1.0, the highest legal threshold: no model can pass, so no prod alias exists afterwards.
    config = tiny(tiny_data, **{"train.hparams": "small", "evaluate.threshold": "1.0"})
    tags = main.main(config)

    assert [stage for stage, _, _ in calls] == [contract.STAGE_TRAIN, contract.STAGE_EVAL]
    assert all(env_manager == "local" for _, _, env_manager in calls)
    best = mlflow.get_run(tags[contract.TAG_TRAIN_RUN_ID]).data.tags[contract.TAG_BEST_RUN_ID]
    assert calls[1][1]["run_id"] == best == tags[contract.TAG_BEST_RUN_ID]  # passed on through the run's tag
    assert tags[contract.TAG_REGISTERED_MODEL] == "Testing_Reg"
    assert contract.TAG_INFER_RUN_ID not in tags
    assert "no Production_Reg@prod yet" in tags[contract.TAG_INFER_SKIPPED]
    pipeline_runs = mlflow.search_runs(experiment_names=["pipeline/test"], output_format="list")
    assert [r.info.status for r in pipeline_runs] == ["FINISHED"]
    assert pipeline_runs[0].data.tags[contract.TAG_INFER_SKIPPED] == tags[contract.TAG_INFER_SKIPPED]
