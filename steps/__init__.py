"""The defect-detection pipeline: one module per MLproject entry point (prepare, train, evaluate, infer, main)."""
