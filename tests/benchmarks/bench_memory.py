"""Benchmark: peak memory of scoring large frames, infer's way against stacking a batch, side by side.

Run with ``make bench-memory`` (or ``python tests/benchmarks/bench_memory.py --write``; ``--quick`` for a
smoke check on small frames). It writes one 8192 x 8192 PNG of noise (64 MP, about 64 MB: a
line-scan frame that does not compress) and hard-links it into a folder ``--files`` times. Each
measurement runs in a new Python process, so one's peak cannot hide another's:

- ``infer``: ``steps.inference.local.score_local``, infer's own loop (chunks bounded in files and bytes,
  each image resized as soon as it is decoded), with the served model around the network of the
  first default set;
- ``stacked``: the preprocessing served models had before, in one call: decode every image of
  the batch, stack same-size images, convert to float32, then resize.

Each reports the growth of the peak resident set (``ru_maxrss``) over the process after the
model was built and warmed up. With ``--write`` the results replace the "memory" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT_DIR))
sys.path.insert(0, str(PROJECT_DIR / "tests"))

from bench_pipeline import machine  # noqa: E402

from helpers import publish  # noqa: E402

BEGIN, END = "<!-- memory:begin -->", "<!-- memory:end -->"

# Run in a new process: build the served model, warm it up, then score the folder one way.
MEASURE = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from steps.inference import local
from steps.served import serving
from steps.core.loader import load_config
from steps.network.model import make_model
mode, folder = sys.argv[2], Path(sys.argv[3])
config = load_config({})
hp = config.hparam_sets[config.train.hparams[0]]
model = serving.DefectModel(make_model(hp, seed=0), {"classes": ["good", "defect"], "image_size": hp.image_size,
                                                    "max_request_pixels": 0})
files = sorted(folder.glob("*.png"))
model.predict(None, [files[0].read_bytes()[:0] or b""], params={"on_error": "row"})  # imports done
ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model.predict(None, [files[0].read_bytes()])  # TensorFlow, the network and the resize warmed up on one frame
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "infer":
    rows = list(local.score_local(model, files, folder, 2**30))
    scored = sum(1 for r in rows if not r["error"])
else:  # the old preprocessing: the whole batch decoded, stacked and made float32 before resizing
    images = np.stack([serving.decode_gray(p.read_bytes()) for p in files])
    resized = serving.resize(images, hp.image_size)
    scored = len(model.network.predict_on_batch(resized))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"scored": scored, "grew_mb": (peak - base) / 1024, "peak_mb": peak / 1024,
                  "one_frame_mb": (base - ready) / 1024}))
"""


def frames(folder: Path, side: int, count: int) -> int:
    """``count`` links to one ``side`` x ``side`` PNG of noise in ``folder``; its size in bytes."""
    from PIL import Image

    first = folder / "frame_000.png"
    noise = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    Image.fromarray(noise).save(first, compress_level=1)
    for i in range(1, count):
        os.link(first, folder / f"frame_{i:03d}.png")
    return first.stat().st_size


def measure(side: int, counts: list[int]) -> dict[str, object]:
    results: dict[str, object] = {"side": side, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for count in counts:
            folder = Path(tmp) / f"{count}"
            folder.mkdir()
            results["file_mb"] = frames(folder, side, count) / 2**20
            for mode in ("infer", "stacked"):
                done = subprocess.run([sys.executable, "-c", MEASURE, str(PROJECT_DIR), mode, str(folder)],
                                      capture_output=True, text=True, check=False)  # fmt: skip
                if done.returncode != 0:
                    figure = {"scored": 0, "grew_mb": float("nan"), "failed": done.stderr.strip().splitlines()[-1]}
                else:
                    figure = json.loads(done.stdout.strip().splitlines()[-1])
                results["runs"].append({"files": count, "mode": mode, **figure})
                print(f"{count} files, {mode}: {figure}", flush=True)
    return results


def report(result: dict, command: str) -> str:
    side = result["side"]
    lines = [
        BEGIN,
        "## Memory: scoring large frames",
        "",
        f"Measured {date.today().isoformat()} with `{command}` on {machine()}. One {side} x {side} PNG of "
        f"noise ({side * side / 1e6:.0f} MP, {result['file_mb']:.0f} MB on disk), scored N times in a new "
        "process per row, with the served model around the first default set's network. Growth: the "
        "peak resident set over the process once it had scored one frame (the model, TensorFlow and one "
        "full-size decode already counted); peak: the whole process's.",
        "",
        "| frames | infer: growth | infer: peak | stacked batch: growth | stacked batch: peak | growth ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["files"], r["mode"]): r for r in result["runs"]}
    for count in sorted({r["files"] for r in result["runs"]}):
        new, old = by[(count, "infer")], by[(count, "stacked")]
        if "failed" in old:
            old_text, ratio = f"failed ({old['failed'][:60]}) | -", "-"
        else:
            old_text = f"{old['grew_mb']:,.0f} MB | {old['peak_mb']:,.0f} MB"
            ratio = f"{old['grew_mb'] / max(new['grew_mb'], 1):.0f}x"
        lines.append(f"| {count} | {new['grew_mb']:,.0f} MB | {new['peak_mb']:,.0f} MB | {old_text} | {ratio} |")
    one = by[(min(r["files"] for r in result["runs"]), "infer")]["one_frame_mb"]
    most = max(r["files"] for r in result["runs"])
    per_pixel = by[(most, "stacked")]["grew_mb"] * 2**20 / (most * side * side)
    lines += [
        "",
        f"Decoding and resizing the first frame cost {one:,.0f} MB over the loaded model (the decoded "
        "frame, its float32 copy for the resize, TensorFlow's buffers); infer's peak then stays put "
        "whatever the number of frames: each is decoded, resized at once and dropped, and a chunk ends "
        "when its files reach 64 MB. The stacked batch, as served models preprocessed before, grows by "
        f"{per_pixel:.1f} bytes per pixel per frame (the uint8 stack, its float32 copy, the resize's own "
        "buffers). A REST request is "
        "refused from the images' headers above `max_request_pixels` (268 MP by default), before "
        "anything is decoded.",
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="put the results in BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="a smoke check on 1024 x 1024 frames")
    parser.add_argument("--files", default="2,8", help="frame counts to score, comma-separated")
    args = parser.parse_args()
    side = 1024 if args.quick else 8192
    result = measure(side, [int(n) for n in args.files.split(",")])
    command = "make bench-memory" + (" ARGS=--quick" if args.quick else "")
    publish(report(result, command), BEGIN, END, args.write, args.quick)


if __name__ == "__main__":
    main()
