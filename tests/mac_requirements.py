"""Check that the requirements install on Apple silicon: ``python tests/mac_requirements.py`` (``make lint``).

pip's ``--platform`` picks wheels for another platform but still evaluates environment markers for
this one, so a ``sys_platform == "darwin"`` line would be dropped here. The Mac's set is worked out
first (``mac_set``: markers evaluated for macOS arm64, Python 3.11), then resolved with
``pip install --dry-run --only-binary=:all: --platform macosx_13_0_arm64``: macOS 13 or newer, as
onnxruntime's arm64 wheels since 1.20 need (TensorFlow's need 12). It fails unless TensorFlow is
the version Linux pins and ``tensorflow-metal`` is among what a Mac installs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

PROJECT_DIR = Path(__file__).resolve().parents[1]
MAC = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix",
       "python_version": "3.11", "python_full_version": "3.11.7", "implementation_name": "cpython",
       "platform_python_implementation": "CPython"}  # fmt: skip


def mac_set(text: str) -> list[str]:
    """The requirement lines a Mac with Apple silicon installs, without their markers."""
    lines = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(MAC):
            req.marker = None
            lines.append(str(req))
    return lines


def resolve(lines: list[str]) -> dict[str, str]:
    """``{package: version}`` pip would install on macOS arm64 from wheels alone."""
    with tempfile.TemporaryDirectory() as tmp:
        reqs, report = Path(tmp) / "mac.txt", Path(tmp) / "report.json"
        reqs.write_text("\n".join(lines) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report",
               str(report), "--platform", "macosx_13_0_arm64", "--python-version", "3.11",
               "--only-binary=:all:", "-r", str(reqs)]  # fmt: skip
        subprocess.run(cmd, check=True)
        return {
            i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
        }


def main() -> None:
    text = (PROJECT_DIR / "requirements.txt").read_text()
    chosen = resolve(mac_set(text))
    linux = re.search(r"^tensorflow==(\S+)\s*$", text, re.M)
    problems = []
    if not linux or chosen.get("tensorflow") != linux.group(1):
        problems.append(f"tensorflow on macOS arm64 is {chosen.get('tensorflow')}, not Linux's pin")
    if "tensorflow-metal" not in chosen:
        problems.append("tensorflow-metal is not installed on macOS arm64")
    if "tensorflow-macos" in chosen:
        problems.append("tensorflow-macos (superseded by tensorflow's own arm64 wheels) is installed")
    if problems:
        raise SystemExit("requirements.txt on Apple silicon: " + "; ".join(problems))
    print(f"requirements.txt resolves on macOS arm64: tensorflow {chosen['tensorflow']}, "
          f"tensorflow-metal {chosen['tensorflow-metal']}, keras {chosen.get('keras')}")  # fmt: skip


if __name__ == "__main__":
    main()
