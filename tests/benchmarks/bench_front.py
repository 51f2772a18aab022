"""Benchmark: the scoring front's peak memory under each attack, and its speed against bare `mlflow models serve`.

Run with ``make bench-front`` (or ``python tests/benchmarks/bench_front.py --write``; ``--quick`` for a
smoke check). In a fresh temporary SQLite store it logs the network of set ``small`` (untrained:
time per image does not depend on the weights) as ``train`` does, registers it as
``Production_Reg`` with its files verified, and aliases it ``prod``. Then:

- peak resident memory (``VmHWM``) of a front started afresh for each case, after it has loaded the
  model and answered one image (the baseline), then after: one 67,000,000 x 1 PNG; an 11 KB zstd
  Parquet body decoding to 300 MB; eight clients at once, each posting 16 4k frames (the most pixels
  one call may hold);
- throughput and latency, the front against ``mlflow models serve`` on the same version, both up at
  once and the requests interleaved: images per second with 16 ELPV test images per call, and the
  p50 of single-image calls.

With ``--write`` the results replace the "scoring front" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from bench_pipeline import machine  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import encode, free_port, publish, wait_until_up  # noqa: E402
from steps.core import contract  # noqa: E402
from steps.core.loader import load_config  # noqa: E402
from steps.datasets.elpv import ensure_data  # noqa: E402
from steps.mlflow_io.runs import ensure_experiment  # noqa: E402
from steps.network.model import make_model, set_seed, with_tta  # noqa: E402
from steps.served import packaging, provenance  # noqa: E402

BEGIN, END = "<!-- front:begin -->", "<!-- front:end -->"


def register() -> None:
    config = load_config({"train.hparams": "small"})
    hp = config.hparam_sets["small"]
    set_seed(config.seed)
    network = with_tta(make_model(hp, config.seed), hp)
    metadata = {"classes": list(config.data.classes), "image_size": hp.image_size, "hparam_set": "small",
                "decision_threshold": 0.5}  # fmt: skip
    with mlflow.start_run(experiment_id=ensure_experiment("bench/front")):
        info = packaging.log_model(network, config, metadata, np.full((hp.image_size,) * 2 + (1,), 128.0), None)
    tags = {contract.VERSION_TAG_CODE_SHA256: provenance.verify(info.model_uri)}
    version = mlflow.register_model(info.model_uri, "Production_Reg", tags=tags).version
    mlflow.MlflowClient().set_registered_model_alias("Production_Reg", "prod", version)


def rows(images: list[bytes]) -> bytes:
    data = [[base64.b64encode(image).decode()] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def post(url: str, body: bytes, content_type: str = "application/json") -> int:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def start(kind: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind == "front":
        cmd = [sys.executable, "-m", "steps.served.front", f"--port={port}"]
    else:
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/Production_Reg@prod",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if not wait_until_up(f"{url}/ping", server, timeout=180):
        raise RuntimeError(f"{kind} did not start")
    return server, url


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def attacks(cell: bytes, quick: bool) -> dict[str, dict[str, object]]:
    wide = encode(Image.new("L", (67_000_000, 1)), "PNG", optimize=True)
    buffer = io.BytesIO()
    pd.DataFrame({"image": [b"\0" * 300 * 2**20]}).to_parquet(buffer, compression="zstd")
    ramp = np.add.outer(np.arange(4096), np.arange(4096)) % 256
    frame = encode(Image.fromarray(ramp.astype(np.uint8)), "PNG")
    clients = 2 if quick else 8
    cases = {
        "one 67,000,000 x 1 PNG": lambda url: [post(url, rows([wide]))],
        "an 11 KB zstd Parquet body (300 MB decoded)": lambda url: [
            post(url, buffer.getvalue(), "application/vnd.apache.parquet")
        ],
        f"{clients} clients at once, 16 4k frames each": lambda url: list(
            ThreadPoolExecutor(clients).map(lambda _: post(url, rows([frame] * 16)), range(clients))
        ),
    }
    results = {}
    for name, attack in cases.items():
        server, url = start("front")
        try:
            assert post(url, rows([cell])) == 200
            baseline = peak_mb(server.pid)
            statuses = attack(url)
            results[name] = {"baseline": baseline, "peak": peak_mb(server.pid), "statuses": sorted(set(statuses))}
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


def speed(cells: list[bytes], rounds: int) -> dict[str, dict[str, list[float]]]:
    servers = {kind: start(kind) for kind in ("front", "mlflow models serve")}
    batch, single = rows(cells[:16]), rows(cells[:1])
    out: dict[str, dict[str, list[float]]] = {kind: {"images_per_s": [], "single_s": []} for kind in servers}
    try:
        for _, url in servers.values():  # warm-up
            for _ in range(3):
                post(url, batch)
        for _ in range(rounds):
            for kind, (_, url) in servers.items():
                started = time.perf_counter()
                assert post(url, batch) == 200
                out[kind]["images_per_s"].append(16 / (time.perf_counter() - started))
                for _ in range(5):
                    started = time.perf_counter()
                    assert post(url, single) == 200
                    out[kind]["single_s"].append(time.perf_counter() - started)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=30)
    return out


def report(memory: dict, fast: dict, quick: bool) -> str:
    lines = [
        BEGIN,
        f"## The scoring front ({date.today().isoformat()}{', --quick: a smoke check' if quick else ''})",
        "",
        f"`make bench-front` on {machine()}.",
        "",
        "Peak resident memory (VmHWM) of a front started afresh for each case: after loading the model and",
        "answering one image, then after the attack. The review measured bare `mlflow models serve` at 15.2 GB",
        "for the wide PNG and 7.0 GB for the Parquet body.",
        "",
        "| attack | answers | baseline MB | peak MB |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, r in memory.items():
        lines.append(f"| {name} | {', '.join(map(str, r['statuses']))} | {r['baseline']:.0f} | {r['peak']:.0f} |")
    lines += [
        "",
        "Side by side, both servers up at once on the same version, requests interleaved:",
        "",
        "| server | images/s (16 per call) | single-image p50 (ms) |",
        "| --- | ---: | ---: |",
    ]
    for kind, r in fast.items():
        lines.append(
            f"| {kind} | {statistics.median(r['images_per_s']):.1f} | {1000 * statistics.median(r['single_s']):.1f} |"
        )
    front, bare = fast["front"], fast["mlflow models serve"]
    ratio = statistics.median(front["images_per_s"]) / statistics.median(bare["images_per_s"])
    lines += ["", f"Front / bare throughput: **{ratio:.2f}**.", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="put the results in BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a smoke check: two clients, two rounds")
    options = parser.parse_args()
    config = load_config()
    cells = [p.read_bytes() for p in sorted((ensure_data(config) / "test").rglob("*.png"))[:16]]
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        register()
        memory = attacks(cells[0], options.quick)
        fast = speed(cells, 2 if options.quick else 20)
    publish(report(memory, fast, options.quick), BEGIN, END, options.write, options.quick)


if __name__ == "__main__":
    main()
