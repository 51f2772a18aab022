"""Entry point ``monitor``: does a folder of images look like the production model's validation images?

The drift check of ``infer`` (``steps.monitoring``) without writing predictions: each image is read and
run through the model as infer would (its probability and embedding are features of the check), and the
verdict is the monitor run's tag ``drift``, with the same metrics, JSON and figure. ``-P drift=fail``
exits 6 on an alert (a scheduled job's signal). Parameters: ``MLproject``.
"""

from __future__ import annotations

import logging

import mlflow

from steps.core import cli, contract, parameters
from steps.core.config import Config
from steps.inference.local import load_production_model, resolve_inputs, score_local
from steps.mlflow_io.records import log_config
from steps.mlflow_io.runs import name_run, stage_run
from steps.monitoring.watch import enforce, judge, watcher

logger = logging.getLogger(__name__)


def monitor(config: Config) -> str:
    """Check ``infer.input`` for drift against the model's reference profile; return the monitor run's ID."""
    ic = config.infer
    spec = config.infer_input
    files, root = resolve_inputs(spec)
    model, uri, version = load_production_model(config.infer_model_uri, ic.batch_size, ic.runtime)
    collector, profile, why_not = watcher(model, uri, "local")
    with stage_run(contract.STAGE_MONITOR, config.experiment) as run:
        name_run(f"monitor {spec} with {uri}")
        log_config(config)
        mlflow.set_tags({contract.TAG_MODEL_URI: config.infer_model_uri, contract.TAG_MODEL_VERSION: version or "",
                         contract.TAG_INFER_RUNTIME: ic.runtime})  # fmt: skip
        logger.info("checking %d images against the reference of %s (version %s)", len(files), uri, version)
        if collector is not None:
            for _ in score_local(model, files, root, ic.max_file_mb * 2**20, observe=collector.add):
                pass  # the rows are not kept: only the features the collector gathers
        report = judge(collector, profile, why_not)
    print(report.summary())
    enforce(report, "fail" if ic.drift == "fail" else "report", f"{len(files)} images checked")
    return run.info.run_id


OVERRIDES = parameters.overrides("monitor")

if __name__ == "__main__":
    cli.main(monitor, "Check a folder of images for drift against the production model's reference.", OVERRIDES)
