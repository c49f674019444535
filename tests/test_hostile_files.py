"""Hostile files in a data set, end to end: a decompression bomb, a header that lies, a zero-byte
file, text named .JPEG, a truncated JPEG and huge but valid images. The prepare job names each in
its bad-file report and finishes; a training epoch names each in the run's decode report and
trains on the rest; and decoding them stays within bounded memory."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import imagenet_fixtures as fx
import numpy as np
import pytest
import ray
import simplejpeg
from PIL import Image

from conftest import ROOT
from pipeline import data
from pipeline.config import PRESETS
from pipeline.data import prepare, sources
from pipeline.data.readers.folder import image_keys

CFG = dataclasses.replace(PRESETS["sample"], resize_size=80, crop_size=67, seed=3)


def png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height, deflated row by row (never held decoded): a
    20000 x 20000 one is 400 M pixels in ~50 KB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + -(-width // 8))  # filter byte 0, then the row's bits
    deflate = zlib.compressobj(9)
    pixels = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16 x 16 JPEG whose frame header (SOF0) says width x height: the data runs out long before."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)  # after marker, length, precision
    return bytes(data)


def truncated_jpeg() -> bytes:
    """A noisy 96 x 96 JPEG (~20 KB, nearly all scan data) cut after half its bytes."""
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    data = simplejpeg.encode_jpeg(noise, quality=90)
    return data[: len(data) // 2]


class Hostile(NamedTuple):
    make: Callable[[], bytes]
    as_is: str | None  # the reason in the prepare job's report (a regex), None for an image it keeps
    resized: str | None  # the same with --resize 64
    training: str | None  # the reason in a training run's decode report


PIL_BOMB = r"image too large \(Image size \(400000000 pixels\) exceeds limit"
OVER_LIMIT = (
    r"image too large: 9000 x 8000 = 72,000,000 pixels to decode, above the limit of 64,000,000 "
    r"\(decode.MAX_PIXELS\)"
)
TRUNCATED = "truncated or corrupt JPEG"
HOSTILE = {
    "bomb.png": Hostile(lambda: png(20000, 20000), PIL_BOMB, PIL_BOMB, PIL_BOMB),
    "huge.png": Hostile(lambda: png(9000, 8000), OVER_LIMIT, OVER_LIMIT, OVER_LIMIT),  # PIL itself would take it
    # Decoded at 1/8 (2500 x 2500, 19 MB) when a smaller size is asked for, then found short of data.
    "bomb_header.JPEG": Hostile(
        lambda: jpeg_claiming(20000, 20000), "image too large: 20000 x 20000 = 400,000,000 pixels", TRUNCATED, TRUNCATED
    ),
    "empty.JPEG": Hostile(lambda: b"", *["zero-byte file"] * 3),
    "text.JPEG": Hostile(
        lambda: b"this is not an image\n" * 4, *["not an image: 84 bytes starting b'this is not '"] * 3
    ),
    "truncated.JPEG": Hostile(truncated_jpeg, TRUNCATED, TRUNCATED, TRUNCATED),
    # 67 M pixels, valid: decoded at 1/8 (1025 x 1025) when a smaller size is asked for, and kept.
    "huge.JPEG": Hostile(
        lambda: simplejpeg.encode_jpeg(np.full((8200, 8200, 1), 128, np.uint8), colorspace="Gray"),
        "image too large: 8200 x 8200 = 67,240,000 pixels",
        None,
        None,
    ),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A tiny ImageNet with the hostile files among the train images: (root, name -> image_id)."""
    root = tmp_path_factory.mktemp("hostile") / "imagenet"
    fx.write_extracted(root, bad=False)
    ids = {}
    for i, (name, hostile_file) in enumerate(HOSTILE.items()):
        wnid = fx.WNIDS[i % len(fx.WNIDS)]
        (root / "train" / wnid / name).write_bytes(hostile_file.make())
        ids[name] = f"train/{wnid}/{name}"
    return root, ids


@pytest.mark.parametrize("resize", [None, 64])
def test_the_prepare_job_names_each_hostile_file_and_finishes(ray_session, hostile, tmp_path, resize):
    root, ids = hostile
    manifest = prepare.prepare(str(root), str(tmp_path / "shards"), resize=resize, log=lambda m: None)
    report = {b["image_id"]: b for b in manifest["bad_files"]}
    for name, hostile_file in HOSTILE.items():
        reason = hostile_file.as_is if resize is None else hostile_file.resized
        entry = report.get(ids[name])
        if reason is None:  # decoded at 1/8 and resized: converted (grayscale), never held at full size
            assert entry == {
                "image_id": ids[name],
                "key": name,
                "reason": "converted from grayscale (L)",
                "action": "converted",
                "split": "train",
            }
        else:
            assert entry is not None and entry["action"] == "skipped", name
            assert re.match(reason, entry["reason"]), (name, entry["reason"])
    train = manifest["splits"]["train"]
    assert train["inputs"] == 12 + len(HOSTILE) == train["images"] + train["skipped"]


def test_a_training_epoch_names_each_hostile_file_and_trains_on_the_rest(ray_session, hostile):
    root, ids = hostile
    source = sources.open_source(str(root))
    report = data.ReadReport.remote()
    rows = data.train_dataset(source, CFG, report, keys=True).take_all()
    refused = {ids[name]: h.training for name, h in HOSTILE.items() if h.training}
    # The read tasks send their failures without waiting for the actor: they may land after the rows.
    deadline = time.monotonic() + 30
    while (failures := ray.get(report.get.remote())).keys() != refused.keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert failures.keys() == refused.keys()
    for key, reason in refused.items():
        assert re.match(reason, failures[key]), (key, failures[key])
    trained = sorted(r["key"] for r in rows)
    assert trained == sorted(set(image_keys(source, "train")) - refused.keys())  # the huge JPEG among them
    assert ids["huge.JPEG"] in trained


MEASURE = """
import json, sys
from pipeline.transforms import decode

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

def peak_mb(decoding):
    # Reset the high-water mark (VmHWM) to what is resident now, decode, and read how far it rose.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    try:
        result = "decoded %s" % (decoding().shape,)
    except decode.DecodeError as e:
        result = e.reason
    return (status("VmHWM") - before) / 1024, result

min_size, control = int(sys.argv[1]) or None, open(sys.argv[2], "rb").read()
results = {}
for path in sys.argv[3:]:
    data = open(path, "rb").read()
    results[path] = peak_mb(lambda: decode.decode_image(data, key=path, min_size=min_size))
# The control: a file decoded in full with no limit, to show that the measurement sees a decode.
results["control"] = peak_mb(lambda: decode.decode_image(control, min_size=None, max_pixels=10**9))
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures with Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("min_size", [CFG.resize_size, 0])
def test_decoding_the_hostile_files_stays_within_bounded_memory(hostile, min_size):
    """How far the resident memory of a process rises while it decodes each file: as training does
    (min_size = the resize size) and as the prepare job does without --resize (full size)."""
    root, ids = hostile
    paths = [str(root / ids[name]) for name in HOSTILE]
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(min_size), str(root / ids["huge.JPEG"]), *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = {Path(path).name: value for path, value in json.loads(out.stdout).items()}
    print(
        f"\n[hostile] min_size {min_size or None}: "
        + "; ".join(f"{name} +{mb:.1f} MB ({result[:40]})" for name, (mb, result) in measured.items())
    )
    control_mb, control = measured.pop("control")
    assert control == "decoded (8200, 8200, 3)" and control_mb > 150  # 8200 x 8200 x 3 bytes = 202 MB
    # Decoded in full, the bombs are 400 M pixels (1.2 GB as RGB); the header bomb at 1/8 is 2500 x 2500 (19 MB).
    assert max(mb for mb, _ in measured.values()) < 32
    huge_mb, huge = measured["huge.JPEG"]
    assert huge == "decoded (1025, 1025, 3)" if min_size else huge.startswith("image too large: 8200 x 8200")
