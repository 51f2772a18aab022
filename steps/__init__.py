"""The defect-detection pipeline: one module per MLproject entry point (prepare, train, evaluate, infer, main)."""

import os

# Quiet unless asked: set before any step imports TensorFlow, whose C++ log otherwise prints its
# CUDA probe (an "E0000 ... failed call to cuInit" line on every CPU-only machine that has the CUDA
# driver stub) and start-up notes in every stage. Python errors still say what went wrong; set
# TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's own log again.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
