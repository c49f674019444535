"""What the prepare job does to each image: any file ImageNet holds -> a plain RGB JPEG, or a reason.

clean_image(data, key=...)   the one decoder (transforms/decode.py), then as it was, or resized so its
                             shorter side is 256 (INTER_AREA), re-encoded only when it must be
BadImage                     a file that is not a usable image, named, for the prepare job's report
KNOWN_PNG, KNOWN_CMYK        ImageNet's own odd files, for reports and tests
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from pipeline.transforms import decode

# The one PNG and the 22 CMYK JPEGs of the train set, all named .JPEG. Source: tensorflow/models,
# research/inception/inception/data/build_imagenet_data.py (_is_png, _is_cmyk), which credits
# github.com/cytsai/ilsvrc-cmyk-image-list. clean_image finds these by content, not by name;
# the lists are for reports and tests.
KNOWN_PNG: tuple[str, ...] = ("n02105855_2933.JPEG",)


KNOWN_CMYK: tuple[str, ...] = (
    "n01739381_1309.JPEG",
    "n02077923_14822.JPEG",
    "n02447366_23489.JPEG",
    "n02492035_15739.JPEG",
    "n02747177_10752.JPEG",
    "n03018349_4028.JPEG",
    "n03062245_4620.JPEG",
    "n03347037_9675.JPEG",
    "n03467068_12171.JPEG",
    "n03529860_11437.JPEG",
    "n03544143_17228.JPEG",
    "n03633091_5218.JPEG",
    "n03710637_5125.JPEG",
    "n03961711_5286.JPEG",
    "n04033995_2932.JPEG",
    "n04258138_17003.JPEG",
    "n04264628_27969.JPEG",
    "n04336792_7448.JPEG",
    "n04371774_5854.JPEG",
    "n04596742_4225.JPEG",
    "n07583066_647.JPEG",
    "n13037406_4650.JPEG",
)


@dataclass(frozen=True)
class CleanImage:
    jpeg: bytes  # an RGB JPEG
    width: int  # of the original image, in pixels (before any resize)
    height: int
    note: str  # "" when kept or only resized; else what it was converted from, for the report


class BadImage(ValueError):
    """A file that is not a usable image; names it so the prepare job can report it (never replace it)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"bad image {key!r}: {reason}")
        self.key = key
        self.reason = reason


# PIL names a JPEG carrying a multi-picture (camera) extension "MPO"; its first frame is a plain JPEG.
_JPEG_FORMATS = ("JPEG", "MPO")


_MODE_NAMES = {
    "L": "grayscale (L)",
    "LA": "grayscale with alpha (LA)",
    "P": "palette (P)",
    "PA": "palette with alpha (PA)",
    "1": "black and white (1)",
    "I;16": "16-bit grayscale (I;16)",
}


def clean_image(data: bytes, *, key: str, resize_shorter: int | None = None, quality: int = 90) -> CleanImage:
    """Any image file's bytes -> an RGB JPEG, or BadImage naming `key` and why.

    The pixels come from decode.decode_image, the decoder training uses, so a shard holds what
    training would have seen in the file, and a bad file is refused for the same reason, in words
    ("zero-byte file", "truncated or corrupt JPEG (...)"). An RGB JPEG that needs no resize comes
    back byte for byte (no second lossy pass); it is still decoded to the last byte, so a truncated
    file fails now and not in training. PNG, CMYK, grayscale, palette and alpha images are converted
    (alpha over white: decode.to_rgb) and encoded at `quality`; `note` says from what.

    resize_shorter: scale so the shorter side is that many pixels, never up. libjpeg decodes at 1/2,
    1/4 or 1/8 while the shorter side stays >= resize_shorter, and an area-averaging resize
    (cv2.INTER_AREA) makes the exact size from there. width/height are the original's.
    """
    if resize_shorter is not None and resize_shorter < 1:
        raise ValueError(f"resize_shorter must be a positive number of pixels or None, got {resize_shorter}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100, got {quality}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With it on, PIL pads a cut-off file with grey and calls it good; a bad file would slip through.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; clean_image needs it "
            "off to tell truncated files from good ones"
        )
    try:
        # min_size never decodes below the size asked for: an image that needs no resize comes at full size.
        pixels = decode.decode_image(data, key=key, min_size=resize_shorter)
    except decode.DecodeError as e:
        raise BadImage(key, e.reason) from None
    try:
        header = Image.open(io.BytesIO(data))  # the header only: the original's size, format and mode
    except Exception as e:  # decode_image read it, so this is unexpected; still a named file, not a crash
        raise BadImage(key, f"unreadable header ({type(e).__name__}: {e})") from None

    width, height = header.size
    converted = header.format not in _JPEG_FORMATS or header.mode != "RGB"
    new_size = _shorter_side_to(header.size, resize_shorter)
    if not converted and new_size is None:
        return CleanImage(data, width, height, "")

    note = ""
    if converted:
        sources = [header.format or "an unknown format"] if header.format not in _JPEG_FORMATS else []
        if header.mode != "RGB":
            sources.append(_MODE_NAMES.get(header.mode, header.mode))
        note = "converted from " + ", ".join(sources)
    if new_size is not None and pixels.shape[1::-1] != new_size:
        # Area averaging from the DCT-reduced image: every source pixel counts once, no aliasing.
        pixels = cv2.resize(pixels, new_size, interpolation=cv2.INTER_AREA)
    # Baseline with 4:2:0 chroma, as PIL writes by default: what every JPEG decoder reads.
    jpeg = simplejpeg.encode_jpeg(
        np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420"
    )
    return CleanImage(jpeg, width, height, note)


def _shorter_side_to(size: tuple[int, int], shorter: int | None) -> tuple[int, int] | None:
    """(width, height) with the shorter side `shorter` and the aspect kept; None to keep the size."""
    width, height = size
    if shorter is None or min(width, height) <= shorter:
        return None  # never upscale: it adds bytes, not information
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter
