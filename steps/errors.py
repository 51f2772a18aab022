"""The pipeline's own error: a stage cannot go on, and the message says what to run or fix first.

``steps.cli`` prints it as one line and exits 2 (``exit_code`` may say otherwise). Bad configuration
is ``steps.config.ConfigError`` and bad data ``steps.data.DataError``; they are printed alike.
"""


class PipelineError(RuntimeError):
    """A stage cannot go on; the message says what to run or fix first."""
