"""The names every stage writes to MLflow, in one place (docs/mlflow.md lists them).

Stages, tests and users read runs through these names, so nothing else in the code spells them.
Registry names and the alias are configuration (``conf/pipeline.yaml``: ``registry``), since the
contract lets ``conf/`` rename them.
"""

from __future__ import annotations

# Experiments are "<stage>/<experiment>", e.g. "train/defect-detection".
STAGE_PIPELINE = "pipeline"
STAGE_PREPARE = "prepare"  # the optional data step
STAGE_TRAIN = "train"
STAGE_EVAL = "eval"
STAGE_INFER = "infer"
STAGE_PROMOTE = "promote"  # moving prod by hand (a rollback)
STAGE_MONITOR = "monitor"  # the drift check alone, on a folder
STAGE_LABEL = "label"  # reviewed images added to the training data


def experiment_name(stage: str, experiment: str) -> str:
    return f"{stage}/{experiment}"


# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces), where pipeline
# runs look empty; this kind opens the "Model training" view. Every experiment the pipeline uses has it.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow's run name tag: stage runs are named for what they are (the stage, the set, the version).
TAG_RUN_NAME = "mlflow.runName"


# Run tags.
TAG_TRAIN_RUN_ID = "train_run_id"
TAG_BEST_RUN_ID = "best_run_id"
TAG_EVAL_RUN_ID = "eval_run_id"
TAG_INFER_RUN_ID = "infer_run_id"
TAG_REGISTERED_MODEL = "registered_model"
TAG_REGISTERED_VERSION = "registered_version"
TAG_DATA_DIGEST = "data_digest"
TAG_HPARAM_SET = "hparam_set"
TAG_SOURCE_RUN_ID = "source_run_id"
TAG_PROMOTED = "promoted"
# Why evaluate did or did not promote, the numbers compared, and the prod version it was compared with.
TAG_PROMOTION_REASON = "promotion_reason"
TAG_CHAMPION_VERSION = "champion_version"
TAG_CHAMPION_RESCORED = "champion_rescored"
# The promote run: the version it moved prod to, the one it replaced, who asked, the versions it
# blocked from automatic promotion so the choice sticks.
TAG_PROMOTED_VERSION = "promoted_version"
TAG_REPLACED_VERSION = "replaced_version"
TAG_REQUESTED_BY = "requested_by"
TAG_BLOCKED_VERSIONS = "blocked_versions"
TAG_MODEL_URI = "model_uri"
TAG_MODEL_VERSION = "model_version"
# Which engine scored, local or spark.
TAG_INFER_ENGINE = "infer_engine"
# What scored: keras, or the onnx or litert export.
TAG_INFER_RUNTIME = "infer_runtime"
# infer: where it wrote its output and the file's SHA-256, so a reused infer is one whose output is intact.
TAG_OUTPUT = "output"
TAG_OUTPUT_SHA256 = "output_sha256"
# main's record of why it did not run infer (no `prod` alias yet).
TAG_INFER_SKIPPED = "infer_skipped"

# Model-version tags in the registry.
VERSION_TAG_ACC = "acc"
VERSION_TAG_TEST_DIGEST = "test_digest"
VERSION_TAG_SOURCE_RUN_ID = "source_run_id"
VERSION_TAG_EVAL_RUN_ID = "eval_run_id"
# "acc.<test_digest>" holds the score on each test set a version was scored on
# (steps.mlflow_io.registry.score_tag); acc and test_digest always hold the latest of them.
VERSION_TAG_DECISION_THRESHOLD = "decision_threshold"
VERSION_TAG_PROD_SINCE = "prod_since"
VERSION_TAG_PROD_UNTIL = "prod_until"
VERSION_TAG_REPLACED_VERSION = "replaced_version"
# The SHA-256 of the version's code file, recomputed from its files and checked against the released
# ones by evaluate before it registers (steps.served.provenance); promote recomputes and compares it.
VERSION_TAG_CODE_SHA256 = "code_sha256"
# Set on a version registered by an evaluation that was not to promote (evaluate.promote false, CI on
# a branch): the rule never gives it prod; promote can, on the record, which removes the tag.
VERSION_TAG_INELIGIBLE = "prod_ineligible"
# Set on a version that a rollback passed over: the rule never gives it prod again on its own.
VERSION_TAG_BLOCKED = "prod_blocked"
# Set on a version whose files a store's retention rule deleted (steps.mlflow_io.store): its entry and scores
# stay; neither the rule nor promote can give it prod.
VERSION_TAG_PRUNED = "artifacts_pruned"
# Where a version's exports are (ONNX, LiteRT and their preprocessing spec): artifact URIs in its
# train run, "runs:/<run id>/exports/<file>", by runtime ("export_onnx", "export_litert") and "export_spec".
VERSION_TAG_EXPORT_PREFIX = "export_"


def export_tag(runtime: str) -> str:
    return f"{VERSION_TAG_EXPORT_PREFIX}{runtime}"


# Metrics. Every epoch of a train child: Keras's names for the loss and accuracy on the training
# and validation splits (the network is compiled with METRIC_ACCURACY; training keeps the epoch with
# the best METRIC_VAL_ACCURACY).
METRIC_LOSS = "loss"
METRIC_ACCURACY = "accuracy"
METRIC_VAL_LOSS = "val_loss"
METRIC_VAL_ACCURACY = "val_accuracy"
EPOCH_METRICS = (METRIC_LOSS, METRIC_ACCURACY, METRIC_VAL_LOSS, METRIC_VAL_ACCURACY)
METRIC_BEST_VAL_ACCURACY = "best_val_accuracy"
METRIC_TEST_ACCURACY = "test_accuracy"
METRIC_PRECISION = "precision"
METRIC_RECALL = "recall"
METRIC_F1 = "f1"
METRIC_ROC_AUC = "roc_auc"
# The same metrics at the model's own decision threshold (tuned on the validation split), balanced
# accuracy at both cut-offs, and the champion's score.
METRIC_BALANCED_ACCURACY = "balanced_accuracy"
TUNED_PREFIX = "tuned_"
METRIC_DECISION_THRESHOLD = "decision_threshold"
METRIC_CHAMPION_TEST_ACCURACY = "champion_test_accuracy"
METRIC_N_IMAGES = "n_images"  # infer: every image given, scored or not
METRIC_N_SCORED = "n_scored"  # infer: the images that got a prediction (n_images - n_errors)
METRIC_N_DEFECT = "n_defect"
METRIC_N_ERRORS = "n_errors"
# train: the threshold objective on the validation split at the tuned cut-off and at 0.5, so a
# cut-off that stayed at 0.5 shows why (nothing scored better), and one that moved shows the gain.
METRIC_OBJECTIVE_AT_CUTOFF = "val_objective_at_cutoff"
METRIC_OBJECTIVE_AT_HALF = "val_objective_at_0.5"
# train: the operating point on the validation split (precision and recall at the cut-off), and
# whether a target objective (min_recall:R, min_precision:P) was met there (1) or not (0: the closest
# cut-off is kept). The model's metadata carries the same, with the objective.
METRIC_VAL_PRECISION_AT_CUTOFF = "val_precision_at_cutoff"
METRIC_VAL_RECALL_AT_CUTOFF = "val_recall_at_cutoff"
METRIC_OBJECTIVE_MET = "val_objective_met"
META_THRESHOLD_OBJECTIVE = "threshold_objective"
META_VAL_PRECISION = "val_precision"
META_VAL_RECALL = "val_recall"
META_OBJECTIVE_MET = "val_objective_met"
# evaluate: every test figure's 95% interval, "<figure>_ci_low" and "<figure>_ci_high" (also
# tuned_-prefixed), a bootstrap over the test images (steps.network.statistics).
CI_LOW_SUFFIX = "_ci_low"
CI_HIGH_SUFFIX = "_ci_high"
# evaluate: the paired comparison with the version holding prod on the same test images: how many
# images both classify alike (right or wrong), those only the new model gets right, those only the
# holder gets right, and the exact McNemar p-value. Also tags on the new version.
METRIC_PAIRED_AGREEMENT = "paired_agreement"
METRIC_PAIRED_CHALLENGER_ONLY = "paired_challenger_only"
METRIC_PAIRED_CHAMPION_ONLY = "paired_champion_only"
METRIC_PAIRED_P_VALUE = "paired_mcnemar_p"
TAG_PAIRED_WITH = "paired_with_version"
# evaluate: each test image's defect probability for the version it scored, as a CSV artifact keyed
# by the test set's digest; the version's tag "predictions.<digest>" points at it.
PREDICTIONS_DIR = "predictions"
VERSION_TAG_PREDICTIONS_PREFIX = "predictions."
# Images left out by data.skip_bad_images, and the class balance of each split, named by label
# (good, defect) so the names do not depend on the folder names; prepare counts each split.
METRIC_N_SKIPPED = "n_skipped"
# Each train child keeps its best epoch's weights (by val_accuracy),
# so it records which epoch that was and its validation scores, which pick the best set; its
# network's forward FLOPs per image; and each epoch's training speed and learning rate. Every
# stage run, and every train child, carries the library versions as tags "versions.<package>".
METRIC_BEST_EPOCH = "best_epoch"
METRIC_BEST_VAL_LOSS = "best_val_loss"
METRIC_FLOPS = "flops_per_image"
METRIC_IMAGES_PER_SECOND = "images_per_second"
METRIC_LEARNING_RATE = "learning_rate"
# A train child's exports: the largest difference of each from the Keras model's defect probability
# on 64 validation images ("onnx_max_abs_diff", "litert_max_abs_diff"); evaluate logs the same on
# the test images.


def export_diff_metric(runtime: str) -> str:
    return f"{runtime}_max_abs_diff"


# What the exports cost: making and checking them (train child), checking them (evaluate), in seconds.
METRIC_EXPORT_SECONDS = "export_seconds"
# Memory, on every stage run and train child that finishes (steps.core.memory): the highest anonymous
# resident memory sampled while the run was open, and the process's peak resident set so far, in MiB.
METRIC_PEAK_ANON_MB = "peak_rss_anon_mb"
METRIC_PEAK_RSS_MB = "peak_rss_mb"
# A train child's parts of peak_rss_anon_mb: training (fit), and the exports, their checks, the drift
# reference and logging the model.
METRIC_PEAK_ANON_FIT_MB = "peak_rss_anon_mb_fit"
METRIC_PEAK_ANON_LOGGING_MB = "peak_rss_anon_mb_logging"


TAG_VERSIONS_PREFIX = "versions."


def class_count_metric(split: str, label_name: str) -> str:
    return f"n_{split}_{label_name}"


def split_count_metric(split: str) -> str:
    return f"n_{split}"


# Which process owns a running stage run ("<host>:<pid>:<start>"), so
# a later stage can tell a run whose process died (killed, out of memory, lost server) and close it;
# and why it was closed.
TAG_PROCESS = "pipeline.process"
TAG_REAPED = "pipeline.reaped"

# A failed stage run's kind of failure (steps.core.errors: input, model, store, output, partial,
# interrupted, bug): `mlflow run` exits 1 for every failure, the tag says which.
TAG_FAILURE_KIND = "failure_kind"

# What determines a stage run's result (steps/mlflow_io/fingerprint.py), set by main on each stage run it
# starts; and, on main's run, "<stage>_reused_from" for a stage it did not run again.
TAG_FINGERPRINT = "pipeline.fingerprint"


def reused_from_tag(stage: str) -> str:
    return f"{stage}_reused_from"


# Artifact paths.
MODEL_ARTIFACT = "model"
CONFIG_ARTIFACT = "config.yaml"
MANIFEST_ARTIFACT = "manifest.csv"
METRICS_ARTIFACT = "metrics.json"
# metrics.json holds every metric under its own name, the tags above under theirs, and these.
METRICS_JSON_CONFUSION = "confusion_matrices"  # by cut-off; rows true, columns predicted
METRICS_JSON_CLASSES = "classes"
METRICS_JSON_N_TEST = "n_test"
CONFUSION_ARTIFACT = "confusion_matrix.png"
CURVES_ARTIFACT = "roc_pr_curves.png"
MISCLASSIFIED_ARTIFACT = "misclassified.png"
SKIPPED_ARTIFACT = "skipped_images.csv"  # path, class, reason of every image skipped
EXPORTS_ARTIFACT = "exports"  # train child: model.onnx, model.tflite, preprocessing.json
GRADCAM_ARTIFACT = "gradcam.png"  # infer: Grad-CAM heat maps of the most confident defects
# infer's drift check (steps.monitoring.drift): its verdict (ok, alert, too_few, unavailable), what it
# compared, each feature's figures as JSON, and the batch's histograms over the reference's.
TAG_DRIFT = "drift"
TAG_DRIFT_PARTS = "drift_parts"
DRIFT_ARTIFACT = "drift.json"
DRIFT_FIGURE = "drift.png"
REVIEW_ARTIFACT = "review"  # infer: the images nearest the cut-off, review.csv to label, their Grad-CAM
METRIC_N_REVIEW = "n_review"
LABELLED_ARTIFACT = "labelled.json"  # label: each image added, its class, content hash and origin
METRIC_N_LABELLED = "n_labelled"
