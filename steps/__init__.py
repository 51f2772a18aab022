"""The defect-detection pipeline.

Entry points, one module each, named as in ``MLproject`` (``python -m steps.<name>``): ``main``,
``prepare``, ``train``, ``evaluate``, ``promote``, ``infer``. Each holds the function that does the
stage's work and a thin command line (``steps.cli``); they import library modules, never each other.

Library modules, by job:

- configuration and contract: ``config`` (conf/*.yaml as typed dataclasses), ``parameters`` (every
  entry point's parameters), ``contract`` (every name MLflow sees), ``errors`` (failure kinds and
  their exit codes);
- data: ``data`` (folder layout, splits, manifests, the decoded-image cache), ``elpv`` (the default
  data set and ``ensure_data``), ``batches`` (the tf.data training input);
- model: ``model`` (``make_model``), ``pretrained`` (ImageNet weights), ``scoring``, ``explain``,
  ``plots``, ``accelerator`` (TensorFlow's devices and plugins);
- the served model: ``serving`` (the registered model's own code: decoding, config, signature,
  the exports' runtimes and preprocessing spec), ``packaging`` (logging it), ``exports`` (the ONNX
  and LiteRT exports and their parity check), ``provenance`` (what a registered model's files may
  hold), ``front`` (the REST front ``make serve`` runs: bounds, a token, following ``prod``);
- MLflow: ``tracking`` (the store), ``store`` (a store kept between CI runs: backups, schema
  upgrade, retention), ``runs`` (stage runs, reaping), ``records`` (what a run logs),
  ``registry`` (versions, the ``prod`` alias and its rule, loading a registered model);
- infer's parts: ``outputs`` (the predictions file), ``spark`` (the Spark engine), ``progress``;
- ``signals`` (a SIGTERM is never lost).

They stay in this package rather than a subpackage: the entry points' ``python -m steps.<name>``
commands and the registered model's code (``steps/serving.py``, logged as a file) keep their
paths, and this list says which module is which.
"""

import gc
import os
import sys

from steps import accelerator

# The collector's thresholds in an entry point's process. It imports TensorFlow, Keras and MLflow:
# millions of objects that live as long as the process, which Python's default thresholds
# (700, 10, 10) have the collector walk again and again, during the imports and after. Running it
# less often costs a little more memory held by cyclic garbage (BENCHMARKS.md, "Start-up").
ENTRY_POINT_GC_THRESHOLDS = (50_000, 20, 20)

# `python -m steps.<name>` (MLproject's commands) only: runpy sets argv[0] to "-m" while it imports
# this package. A process that merely imports steps (a model server, Spark's workers, the tests)
# keeps its own settings.
if sys.argv[:1] == ["-m"]:
    gc.set_threshold(*ENTRY_POINT_GC_THRESHOLDS)

# Quiet unless asked: set before any step imports TensorFlow, whose C++ log otherwise prints its
# CUDA probe (an "E0000 ... failed call to cuInit" line on every CPU-only machine that has the CUDA
# driver stub) and start-up notes in every stage. Python errors still say what went wrong; set
# TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own log again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Before anything imports TensorFlow: a GPU plugin (tensorflow-metal) that does not load with this
# TensorFlow costs one warning line and the CPU, not the import.
accelerator.guard_plugins()
