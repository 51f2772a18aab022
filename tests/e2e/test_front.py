"""The scoring front over loopback: each attack the review posted gets its 4xx with a one-line reason
and the server's peak memory stays bounded; a promotion while a client scores switches the answers
to the new version within the polling interval, with no failed request. The real front process
(`python -m steps.served.front`, as `make serve` starts it) on a copy of the prod world's store.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import PROJECT_DIR, encode, free_port, use_copy_of, wait_until_up
from steps.core.loader import load_config
from steps.served import front, provenance

pytestmark = [pytest.mark.model, pytest.mark.slow]

# What the front may hold at its peak through every attack here: the model and TensorFlow take about
# 1.3 GB resident once loaded; the rest is what the bounds allow (BENCHMARKS.md, "The scoring front").
PEAK_BOUND_MB = 2500
POLL_SECONDS = 1


def post(url: str, body: bytes, content_type: str = "application/json", headers: dict | None = None):
    """``(status, headers, body)`` of a POST, whatever the status."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def rows(*images: bytes) -> bytes:
    data = [[base64.b64encode(image).decode()] for image in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def peak_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def world(prod_world, tmp_path_factory):
    """The front on a copy of the prod world's store, and the store: ``(url, process, store uri, cell PNG)``."""
    db, _ = prod_world
    root = tmp_path_factory.mktemp("front")
    patch = pytest.MonkeyPatch()
    uri = use_copy_of(db, root, patch)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, front.TOKEN_ENV: "s3cret"}
    cmd = [sys.executable, "-m", "steps.served.front", f"--port={port}", f"--poll_seconds={POLL_SECONDS}"]
    log = open(root / "front.log", "w")  # noqa: SIM115 - open while the server runs
    process = subprocess.Popen(cmd, cwd=PROJECT_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_up(f"{url}/ping", process, timeout=120):
            pytest.fail("the front did not start:\n" + (root / "front.log").read_text()[-3000:])
        cell = sorted((db.parent / "data" / "test").rglob("*.png"))[0].read_bytes()
        yield url, process, uri, cell
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
        patch.undo()


AUTH = {"Authorization": "Bearer s3cret"}


def test_a_request_without_the_token_is_refused(world):
    url, _, _, cell = world
    status, _, body = post(f"{url}/invocations", rows(cell))
    assert status == 401 and json.loads(body)["message"].startswith("a bearer token is required")
    status, headers, body = post(f"{url}/invocations", rows(cell), headers=AUTH)
    assert status == 200 and headers["x-model-version"] == "1"
    assert json.loads(body)["predictions"][0]["error"] == ""


WIDE = encode(Image.new("L", (67_000_000, 1)), "PNG", optimize=True)


def zstd_parquet() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"image": [b"\0" * 300 * 2**20]}).to_parquet(buffer, compression="zstd")
    return buffer.getvalue()


ATTACKS = {
    # name: (body, content type, status, the reason's start)
    "a very wide image": (lambda cell: rows(WIDE), "application/json", 400, "row 0 of 1 cannot be used: 67000000x1"),
    "a compressed parquet body": (
        lambda cell: zstd_parquet(),
        "application/vnd.apache.parquet",
        415,
        "content type 'application/vnd.apache.parquet'",
    ),
    "raw bytes as CSV": (lambda cell: os.urandom(94_000), "text/csv", 415, "content type 'text/csv' is not served"),
    "JSON nested 100,000 deep": (lambda cell: b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "JSON nested"),
    "50,000 tiny PNGs": (
        lambda cell: rows(*[encode(Image.new("L", (1, 1)), "PNG")] * 50_000),
        "application/json",
        413,
        "50000 images",
    ),
    "a base64 PNG as instances": (
        lambda cell: json.dumps({"instances": [{"image": base64.b64encode(cell).decode()}]}).encode(),
        "application/json",
        400,
        "instances and inputs carry no column types",
    ),  # fmt: skip
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_gets_its_4xx_in_one_line_that_never_echoes_the_upload(world, attack):
    url, process, _, cell = world
    make, kind, status, reason = ATTACKS[attack]
    body = make(cell)
    got, headers, answer = post(f"{url}/invocations", body, kind, AUTH)
    message = json.loads(answer)["message"]
    assert (got, message[: len(reason)]) == (status, reason), message
    assert "\n" not in message and len(answer) < 1000
    assert base64.b64encode(body[:30]).decode()[:20] not in message


def test_a_body_declared_over_the_cap_is_refused_before_it_is_read(world):
    import http.client

    url, _, _, _ = world
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/invocations")
    for name, value in {"Content-Type": "application/json", "Content-Length": str(65 * 2**20), **AUTH}.items():
        connection.putheader(name, value)
    connection.endheaders()  # and no body at all: the answer comes from the headers alone
    answer = connection.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["message"].startswith(f"a body of {65 * 2**20} bytes, more than")
    connection.close()


def test_eight_clients_with_the_largest_allowed_call_keep_the_peak_bounded(world):
    """After every attack above, eight clients at once, each with the most images of the largest
    size one call may hold; every answer is a 200 or a 503 (busy), and the peak stays bounded."""
    url, process, _, _ = world
    limits = load_config().serve
    ramp = np.add.outer(np.arange(4096), np.arange(4096)) % 256  # a 4k frame that compresses, so that
    frame = encode(Image.fromarray(ramp.astype(np.uint8)), "PNG")  # 16 fit in one body under the cap
    call = rows(*[frame] * min(limits.max_images, 16))  # 16 4k frames: the model's per-call pixel cap
    assert len(call) < limits.max_body_mb * 2**20

    with ThreadPoolExecutor(8) as pool:
        statuses = [s for s, _, _ in pool.map(lambda _: post(f"{url}/invocations", call, headers=AUTH), range(8))]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    assert peak_mb(process.pid) < PEAK_BOUND_MB


def test_a_promotion_reaches_a_scoring_client_within_the_polling_interval(world):
    url, _, uri, cell = world
    client = mlflow.MlflowClient(uri)
    first = client.get_model_version("Production_Reg", "1")
    again = client.create_model_version(
        "Production_Reg", first.source, run_id=first.run_id,
        tags={**first.tags, "acc": "0.99"},  # the same files, verified as the first: it may hold prod
    )  # fmt: skip
    assert provenance.check_version(client, "Production_Reg", str(again.version))
    answers, stop = [], threading.Event()

    def keep_scoring():
        while not stop.is_set():
            status, headers, _ = post(f"{url}/invocations", rows(cell), headers=AUTH)
            answers.append((time.monotonic(), status, headers.get("x-model-version")))

    scorer = threading.Thread(target=keep_scoring)
    scorer.start()
    try:
        time.sleep(1)
        client.set_registered_model_alias("Production_Reg", "prod", str(again.version))
        moved = time.monotonic()
        deadline = moved + POLL_SECONDS + 60  # the poll, then loading the version
        while time.monotonic() < deadline and not any(v == str(again.version) for _, _, v in answers):
            time.sleep(0.2)
    finally:
        stop.set()
        scorer.join()
    assert {status for _, status, _ in answers} == {200}
    switched = [t for t, _, v in answers if v == str(again.version)]
    assert switched, "the front never served the new version"
    assert all(v == str(again.version) for t, _, v in answers if t > switched[0])  # no flapping back
    with urllib.request.urlopen(urllib.request.Request(f"{url}/version", headers=AUTH)) as answer:
        assert json.loads(answer.read())["version"] == str(again.version)


def test_the_pure_checks_measure_depth_count_rows_and_keep_one_line():
    assert front.json_depth(b'["a\\"[b", {"c": [[1]]}]') == 4  # brackets inside strings do not count
    assert front.json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000
    assert front.count_rows({"dataframe_records": [{"image": "x"}] * 3}, 64) == 3
    with pytest.raises(front.Refused, match="expected exactly one of dataframe_split or dataframe_records"):
        front.count_rows({"dataframe_split": {"data": []}, "dataframe_records": []}, 64)
    upload = "iVBORw0KGgoAAAANSUhEUgAA"  # what MLflow quotes back
    assert front.one_line(f"Failed to predict data '{upload}'. \nError: row 0 of 1 cannot be used: x") == (
        "row 0 of 1 cannot be used: x"
    )
    assert front.one_line(f"Failed to predict data '{upload}'.") == "the model could not score this request"
    assert front.one_line(f"Ensure that input is a valid JSON formatted string. Error: 'E'\nInput: \n{upload}") == (
        "Ensure that input is a valid JSON formatted string. Error: 'E'"
    )
