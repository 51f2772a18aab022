"""The pipeline's vocabulary, shared by every stage: configuration and parameters, every name MLflow sees
(``contract``), failure kinds and exit codes, the command line each entry point runs, and signals."""
