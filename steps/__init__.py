"""The defect-detection pipeline: the MLproject entry points (prepare, train, evaluate, infer, promote,
main), one module each, and the library modules they share."""

import os

from steps import accelerator

# Quiet unless asked: set before any step imports TensorFlow, whose C++ log otherwise prints its
# CUDA probe (an "E0000 ... failed call to cuInit" line on every CPU-only machine that has the CUDA
# driver stub) and start-up notes in every stage. Python errors still say what went wrong; set
# TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own log again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Before anything imports TensorFlow: a GPU plugin (tensorflow-metal) that does not load with this
# TensorFlow costs one warning line and the CPU, not the import.
accelerator.guard_plugins()
