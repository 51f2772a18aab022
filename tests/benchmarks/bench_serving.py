"""Benchmark: the registered model serving images, against the bare network, side by side in one run.

Run with ``make bench-serving`` (or ``python tests/benchmarks/bench_serving.py --write``; ``--quick`` for a
smoke check). In a fresh temporary SQLite store it logs and registers the network of one
hyperparameter set (``--hparams``, default ``small``, the set that won the pipeline benchmark) at
the default image size, exactly as ``train`` and ``evaluate`` do, as ``Bench_Reg@prod``. Its
weights are not trained: the time per image does not depend on their values. Then, on the real
ELPV test images (300x300 grayscale PNG):

- throughput, repeated and interleaved: the pyfunc loaded from the registry on the encoded bytes
  (decode, resize, predict) against ``keras.Model.predict`` on arrays already decoded and resized
  (the network alone), as images per second and their ratio;
- single-image REST latency: ``mlflow models serve`` on loopback, one base64 PNG per request,
  sequential, after a warm-up; p50 and p95;
- model load time from the registry: in this (warm) process, and as a new process that also
  imports MLflow and TensorFlow.

With ``--write`` the results replace the "serving" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import mlflow  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import free_port, publish, spread, wait_until_up  # noqa: E402
from steps import packaging  # noqa: E402
from steps.config import load_config  # noqa: E402
from steps.data import load_images, scan_split  # noqa: E402
from steps.elpv import ensure_data  # noqa: E402
from steps.model import make_model, set_seed, with_tta  # noqa: E402

BEGIN, END = "<!-- serving:begin -->", "<!-- serving:end -->"
NAME = "Bench_Reg"
URI = f"models:/{NAME}@prod"


def register(hparams: str) -> tuple[object, int]:
    """Log the network of set ``hparams`` as train does, register it, alias it prod; (config, image size)."""
    config = load_config({"train.hparams": hparams})
    hp = config.hparam_sets[hparams]
    size = hp.image_size
    set_seed(config.seed)
    network = with_tta(make_model(hp, config.seed), hp)  # as train logs it
    metadata = {"classes": list(config.data.classes), "image_size": size, "hparam_set": hparams,
                "decision_threshold": 0.5}  # fmt: skip
    with mlflow.start_run():
        info = packaging.log_model(network, config, metadata, example=np.full((size, size, 1), 128.0, np.float32))
    version = mlflow.register_model(info.model_uri, NAME).version
    mlflow.MlflowClient().set_registered_model_alias(NAME, "prod", version)
    return config, size


def throughput(paths: list[Path], size: int, repeats: int) -> dict[str, list[float]]:
    """Images per second of the pyfunc on bytes and of the bare network on preprocessed arrays."""
    import pandas as pd

    model = mlflow.pyfunc.load_model(URI)
    network = model.unwrap_python_model().network
    frame = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
    arrays, failures = load_images(paths, size, progress=False)
    assert not failures
    model.predict(frame.head(64))  # warm both: graph tracing is not throughput
    network.predict(arrays[:64], batch_size=64, verbose=0)
    result: dict[str, list[float]] = {"pyfunc": [], "keras": []}
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits both alike
        start = time.perf_counter()
        out = model.predict(frame)
        result["pyfunc"].append(len(paths) / (time.perf_counter() - start))
        assert (out["error"] == "").all()
        start = time.perf_counter()
        network.predict(arrays, batch_size=64, verbose=0)
        result["keras"].append(len(paths) / (time.perf_counter() - start))
    return result


def rest_latency(image: bytes, requests: int) -> list[float]:
    """Seconds per single-image request to ``mlflow models serve``, sequential, after 10 warm-ups."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}})
    post = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    try:
        if not wait_until_up(f"http://127.0.0.1:{port}/ping", server, timeout=180):
            raise RuntimeError("mlflow models serve did not start")
        times = []
        for i in range(10 + requests):
            start = time.perf_counter()
            with urllib.request.urlopen(post, timeout=60) as response:
                assert json.loads(response.read())["predictions"][0]["error"] == ""
            if i >= 10:
                times.append(time.perf_counter() - start)
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def load_times(repeats: int) -> dict[str, list[float]]:
    """Seconds to load the model from the registry: warm (this process) and cold (a new one)."""
    warm, cold = [], []
    script = f"import mlflow; mlflow.pyfunc.load_model({URI!r})"
    for _ in range(repeats):
        start = time.perf_counter()
        mlflow.pyfunc.load_model(URI)
        warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
        cold.append(time.perf_counter() - start)
    return {"warm": warm, "cold": cold}


def report(r: dict, quick: bool, hparams: str) -> str:
    ratios = [p / k for p, k in zip(r["throughput"]["pyfunc"], r["throughput"]["keras"], strict=True)]
    latency_ms = np.array(r["latency"]) * 1000
    command = "make bench-serving" + (' ARGS="--quick"' if quick else "")
    return "\n".join(
        [
            BEGIN,
            f"Measured {date.today().isoformat()} with `{command}` on {machine()}; the `{hparams}` network at "
            f"{r['size']}x{r['size']}, {r['n_images']} ELPV test images (300x300 grayscale PNG), "
            f"{len(ratios)} interleaved repeats (median, with the range in brackets).",
            "",
            "| what | value |",
            "| --- | --- |",
            f"| pyfunc on encoded bytes (decode, resize, predict), images/s | {spread(r['throughput']['pyfunc'])} |",
            f"| `keras.Model.predict` on decoded, resized arrays, images/s | {spread(r['throughput']['keras'])} |",
            f"| ratio pyfunc / Keras, per repeat (goal: at least 0.8) | {spread(ratios, '{:.2f}')} |",
            f"| REST, one image per request, p50 / p95 ({len(latency_ms)} requests; goal: p50 under 25 ms) "
            f"| {np.percentile(latency_ms, 50):.1f} ms / {np.percentile(latency_ms, 95):.1f} ms |",
            f"| model load from the registry, in a warm process | {spread(r['load']['warm'], '{:.2f}')} s |",
            f"| model load in a new process (with the MLflow and TensorFlow imports) "
            f"| {spread(r['load']['cold'], '{:.1f}')} s |",
            END,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the serving section of BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a smoke check: 64 images, 2 repeats, 20 requests")
    parser.add_argument("--hparams", default="small", help="which set of conf/hparams.yaml (default small)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        config, size = register(options.hparams)
        data_dir = ensure_data(config)
        paths = [s.path for s in scan_split(data_dir, "test", config.data.classes)]
        paths = paths[:: max(1, len(paths) // 64)][:64] if options.quick else paths
        results = {
            "size": size,
            "n_images": len(paths),
            "throughput": throughput(paths, size, 2 if options.quick else 5),
            "latency": rest_latency(paths[0].read_bytes(), 20 if options.quick else 200),
            "load": load_times(1 if options.quick else 3),
        }
    publish(report(results, options.quick, options.hparams), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
