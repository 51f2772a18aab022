"""infer on a standalone Spark cluster: a master and two workers started from pyspark's own jars on
127.0.0.1, as a team's cluster would be reached (``-P spark_master=spark://host:port``)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import world_config
from helpers import spark_cluster, tasks_run, use_copy_of
from steps import infer
from steps.inference import spark

pytestmark = [
    pytest.mark.slow,
    pytest.mark.model,
    pytest.mark.skipif(spark.java_problem() is not None, reason=f"Spark needs Java 17+: {spark.java_problem()}"),
]


def test_infer_on_a_two_worker_cluster_uses_both_and_writes_the_local_engines_rows(prod_world, tmp_path, monkeypatch):
    db, _ = prod_world
    use_copy_of(db, tmp_path, monkeypatch)
    data = db.parent / "data"
    # A path every executor can read: on one machine, any local folder.
    incoming = shutil.copytree(data / "test", tmp_path / "incoming")
    for i, image in enumerate(sorted(incoming.rglob("*.png"))):  # 36 images: more tasks than executors
        for k in (1, 2):
            shutil.copy(image, image.with_name(f"copy{k}-{i}.png"))
    from pyspark.sql import SparkSession

    if SparkSession.getActiveSession():  # another test's local session would be reused, whatever the master
        SparkSession.getActiveSession().stop()
    # The job starts once both executors have registered, so that both can take part.
    monkeypatch.setenv("PYSPARK_SUBMIT_ARGS", "--conf spark.scheduler.minRegisteredResourcesRatio=1.0 pyspark-shell")
    rows = {}
    with spark_cluster(tmp_path / "cluster", workers=2) as cluster:
        for engine, master in (("local", "local[1]"), ("spark", cluster.master)):
            output = tmp_path / f"{engine}.jsonl"
            infer.infer(world_config(data, tmp_path, **{"infer.input": str(incoming), "infer.output": str(output),
                                                       "infer.engine": engine, "infer.spark_master": master,
                                                       "infer.drift": "off", "infer.review_top": "0"}))  # fmt: skip
            rows[engine] = [json.loads(line) for line in output.read_text().splitlines()]
        SparkSession.getActiveSession().stop()  # the executors' logs are complete once the app ends
        tasks = [tasks_run(work) for work in cluster.work_dirs]
    assert all(n >= 1 for n in tasks), f"tasks per worker: {tasks}"  # both executors took part
    assert len(rows["spark"]) == len(rows["local"]) == 36
    for local, remote in zip(rows["local"], rows["spark"], strict=True):
        assert (remote["path"], remote["predicted_class"]) == (local["path"], local["predicted_class"])
        assert remote["defect_probability"] == pytest.approx(local["defect_probability"], abs=1e-6)
