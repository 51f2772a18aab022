"""Benchmark: the registered model serving images, against the bare network, side by side in one run.

Run with ``make bench-serving`` (or ``python tests/benchmarks/bench_serving.py --write``; ``--quick`` for a
smoke check). In a fresh temporary SQLite store it logs and registers the network of one
hyperparameter set (``--hparams``, default ``small``, trained from scratch: the smallest network, so
decoding and each runtime's own overhead show the most; the pipeline's ``lite160`` also works) at
the default image size, exactly as ``train`` and ``evaluate`` do, as ``Bench_Reg@prod``. Its
weights are not trained: the time per image does not depend on their values. Then, on the real
ELPV test images (300x300 grayscale PNG):

- throughput, repeated and interleaved: the pyfunc loaded from the registry on the encoded bytes
  (decode, resize, predict) against ``keras.Model.predict`` on arrays already decoded and resized
  (the network alone), as images per second and their ratio;
- the same pyfunc with each runtime of model config ``runtime`` (the Keras network, its ONNX export
  in onnxruntime, its LiteRT export in LiteRT's interpreter), interleaved: images per second on the
  whole set, single-image latency (one image per ``predict``, in process), load time in a new
  process, and the installed size of the packages each runtime needs beyond MLflow, Pillow and NumPy;
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
from importlib import metadata as dist_metadata
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import mlflow  # noqa: E402
from bench_pipeline import machine  # noqa: E402

from helpers import free_port, publish, spread, wait_until_up  # noqa: E402
from steps.core.loader import load_config  # noqa: E402
from steps.datasets.data import load_images, scan_split  # noqa: E402
from steps.datasets.elpv import ensure_data  # noqa: E402
from steps.network import exports  # noqa: E402
from steps.network.model import make_model, set_seed, with_tta  # noqa: E402
from steps.served import packaging, serving  # noqa: E402

BEGIN, END = "<!-- serving:begin -->", "<!-- serving:end -->"
NAME = "Bench_Reg"
URI = f"models:/{NAME}@prod"


def register(hparams: str) -> tuple[object, int]:
    """Log the network of set ``hparams`` as train does, register it, alias it prod; (config, image size)."""
    config = load_config({"train.hparams": hparams})
    hp = config.hparam_sets[hparams]
    size = hp.image_size
    set_seed(config.seed)
    trained = make_model(hp, config.seed)
    network = with_tta(trained, hp)  # as train logs it
    metadata = {"classes": list(config.data.classes), "image_size": size, "hparam_set": hparams,
                "decision_threshold": 0.5}  # fmt: skip
    with mlflow.start_run(), tempfile.TemporaryDirectory() as tmp:
        paths = exports.write_exports(trained, size, hp.tta, metadata, Path(tmp), config.train.export_formats)
        example = np.full((size, size, 1), 128.0, np.float32)
        info = packaging.log_model(network, config, metadata, example=example, exports=paths)
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


def runtimes(paths: list[Path], repeats: int, singles: int) -> dict[str, dict[str, list[float]]]:
    """Per runtime: images/s of the pyfunc on the whole set, and seconds per single-image predict."""
    import pandas as pd

    models = {r: mlflow.pyfunc.load_model(URI, model_config={"runtime": r}) for r in serving.RUNTIMES}
    frame = pd.DataFrame({"image": [p.read_bytes() for p in paths]})
    result: dict[str, dict[str, list[float]]] = {r: {"throughput": [], "single": []} for r in models}
    for model in models.values():
        model.predict(frame.head(64))  # warm: graph tracing and arena allocation are not throughput
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all alike
        for runtime, model in models.items():
            start = time.perf_counter()
            out = model.predict(frame)
            result[runtime]["throughput"].append(len(paths) / (time.perf_counter() - start))
            assert (out["error"] == "").all()
    for i in range(singles):
        for runtime, model in models.items():
            one = frame.iloc[[i % len(frame)]]
            start = time.perf_counter()
            model.predict(one)
            result[runtime]["single"].append(time.perf_counter() - start)
    return result


def cold_loads(repeats: int) -> dict[str, list[float]]:
    """Seconds for a new process to import MLflow, load the model with each runtime and score one image."""
    script = (
        "import sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1], "
        "model_config={'runtime': sys.argv[2]}); m.predict(pd.DataFrame({'image': [open(sys.argv[3], 'rb').read()]}))"
    )
    image = str(next((PROJECT_DIR / "data" / "test").rglob("*.png")))
    times: dict[str, list[float]] = {r: [] for r in serving.RUNTIMES}
    for _ in range(repeats):
        for runtime in serving.RUNTIMES:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", script, URI, runtime, image], check=True, capture_output=True)
            times[runtime].append(time.perf_counter() - start)
    return times


# What each runtime needs beyond what every served model has (MLflow, Pillow, NumPy, pandas).
RUNTIME_PACKAGES = {"keras": ("tensorflow", "keras"), "onnx": ("onnxruntime",), "litert": ("ai-edge-litert",)}
BASE_PACKAGES = ("mlflow", "pillow", "numpy", "pandas")


def closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions ``names`` need, themselves included (markers evaluated here, no extras)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            requires = dist_metadata.distribution(name).requires or []
        except dist_metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def installed_mb() -> dict[str, float]:
    """Megabytes on disk of the distributions each runtime adds to a served model's base set."""
    base = closure(BASE_PACKAGES)
    sizes = {}
    for runtime, names in RUNTIME_PACKAGES.items():
        total = 0
        for name in closure(names) - base:
            for file in dist_metadata.distribution(name).files or []:
                located = Path(file.locate())
                total += located.stat().st_size if located.is_file() else 0
        sizes[runtime] = total / 1e6
    return sizes


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
            "",
            "The same registered model with each value of its model config `runtime` (`infer -P runtime=...`), "
            f"{len(r['runtimes']['keras']['throughput'])} interleaved repeats on the same images; single-image "
            f"latency over {len(r['runtimes']['keras']['single'])} one-image calls; a new process imports MLflow, "
            "loads the model and scores one image; installed size: the packages a runtime adds to MLflow, "
            "Pillow, NumPy and pandas, with their dependencies.",
            "",
            "| runtime | images/s | vs Keras | single image, p50 / p95 | new process: load and score one | installed |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[runtime_row(r, runtime) for runtime in r["runtimes"]],
            END,
        ]
    )


def runtime_row(r: dict, runtime: str) -> str:
    measured = r["runtimes"][runtime]
    keras = r["runtimes"]["keras"]["throughput"]
    ratios = [a / b for a, b in zip(measured["throughput"], keras, strict=True)]
    single_ms = np.array(measured["single"]) * 1000
    return (
        f"| {runtime} | {spread(measured['throughput'])} | {spread(ratios, '{:.2f}')} | "
        f"{np.percentile(single_ms, 50):.1f} ms / {np.percentile(single_ms, 95):.1f} ms | "
        f"{spread(r['cold'][runtime], '{:.1f}')} s | {r['installed'][runtime]:,.0f} MB |"
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
            "runtimes": runtimes(paths, 2 if options.quick else 5, 20 if options.quick else 100),
            "cold": cold_loads(1 if options.quick else 3),
            "installed": installed_mb(),
        }
    publish(report(results, options.quick, options.hparams), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
