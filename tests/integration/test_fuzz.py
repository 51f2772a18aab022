"""Fuzzing the image decoder: mutated bytes of real image files never crash it and never hang it.

Hypothesis mutates PNG, JPEG, BMP, TIFF, GIF and WebP encodings of a real ELPV cell (flipped bytes,
cuts, insertions, overwritten headers). Every input must either decode to an 8-bit grayscale
array or raise ``ImageError``, the one exception the stages turn into a skipped file or a
per-row error, within a time limit enforced by an alarm, so a hang fails instead of stalling.
The default run tries a few hundred inputs in seconds; ``FUZZ_EXAMPLES=20000 pytest
tests/integration/test_fuzz.py`` searches longer.
"""

from __future__ import annotations

import io
import os
import signal
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from steps.datasets.elpv import elpv_labels
from steps.served.serving import ImageError, decode_gray

pytestmark = pytest.mark.data

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
SECONDS_PER_INPUT = 5  # a 48x48 image decodes in well under a millisecond


def seeds() -> dict[str, bytes]:
    """One real ELPV cell (downscaled), encoded in every format the pipeline reads, plus 16-bit."""
    with Image.open(elpv_labels()["source"][0]) as original:
        cell = original.convert("L").resize((48, 48), Image.Resampling.BILINEAR)
    out = {}
    for fmt, image in [
        ("PNG", cell),
        ("JPEG", cell),
        ("BMP", cell),
        ("TIFF", cell),
        ("GIF", cell),
        ("WEBP", cell.convert("RGB")),
        ("PNG16", Image.fromarray(np.asarray(cell, np.uint16) * 257)),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, fmt.removesuffix("16"))
        out[fmt] = buffer.getvalue()
    return out


SEEDS = seeds()


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "header"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif action == "header" and len(data) > 32:
            # Sizes, bit depths and offsets live in the first bytes: large values there are the dangerous ones.
            spot = draw(st.integers(0, 31))
            data[spot : spot + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"])
            )
    return bytes(data)


@contextmanager
def time_limit(seconds: int):
    def hang(signum, frame):
        raise TimeoutError(f"the decoder ran for more than {seconds} s on one input")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt metadata we feed it
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=mutated())
def test_mutated_images_decode_or_fail_cleanly(data):
    with time_limit(SECONDS_PER_INPUT):
        try:
            gray = decode_gray(data)
        except ImageError as err:
            assert str(err)  # a reason a person can read
            return
    assert gray.dtype == np.uint8 and gray.ndim == 3 and gray.shape[2] == 1 and gray.size > 0


def test_the_seeds_themselves_decode():
    """The fuzzer starts from valid files: each seed decodes to the same 48x48 cell."""
    for fmt, data in SEEDS.items():
        assert decode_gray(data).shape == (48, 48, 1), fmt
