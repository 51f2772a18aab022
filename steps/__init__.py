"""The defect-detection pipeline: the entry points of ``MLproject`` on top, the library in packages below.

Entry points, one module each, named as in ``MLproject`` (``python -m steps.<name>``): ``main``,
``prepare``, ``train``, ``evaluate``, ``promote``, ``infer``. They import the library, never each
other. The library, by concern (each package's ``__init__`` says what lives there): ``core``
(configuration, parameters, names MLflow sees, errors, the command line), ``datasets`` (images on
disk), ``network`` (the Keras network, scoring, exports), ``served`` (the registered model's own
code and the REST front), ``mlflow_io`` (the store, runs, the registry and its rule) and
``inference`` (infer's outputs and Spark engine).
"""

import gc
import os
import sys

from steps.network import accelerator

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
