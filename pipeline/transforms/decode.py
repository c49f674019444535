"""The one image decoder: file bytes -> RGB uint8 pixels, already near the working size.

Training (stages.py), the prepare job (data/clean.py) and the lighting pass all decode here,
so a file gives the same pixels whichever path reads it.

    JPEG, YCbCr or grayscale  simplejpeg (libjpeg-turbo), strict: a truncated or corrupt file raises
                              instead of coming back padded with grey. DCT-domain scaling by 1/2, 1/4
                              or 1/8 while both sides stay >= min_size: the first step of the resize,
                              done for free inside the decoder.
    anything else PIL reads   CMYK / YCCK JPEG (ImageNet has 22), PNG (it has one), palette, alpha:
                              PIL, with its JPEG draft mode, alpha composited over white.
    resized_crop              OpenCV: bilinear resize of only the region that becomes the crop, and
                              the mirror image by cv2.flip (a NumPy [:, ::-1] copy costs ~0.2 ms).

Measured on one core of the dev VM (500x375 photo-like JPEGs, quality 90): PIL decode 890 img/s,
simplejpeg 1,100; PIL draft + box resize to a 224 crop 549, simplejpeg + OpenCV 745 (jobs/benchmark.py
measures the whole path; BENCHMARKS.md). Only the power-of-two scales are used: libjpeg-turbo's
3/8 and 6/8 decode slower than 1/2 (456 vs 512 img/s at 960x720) or even than a full decode.

The crop region is rounded to whole source pixels (crop_box), so a crop sits up to half a source
pixel from where the unrounded arithmetic puts it: crop positions stay uniform, to within that. The
resize is bilinear without antialiasing; after the DCT scaling the remaining factor is between 1/2
and 1, where that aliases little (INTER_AREA, antialiased, costs 25% of the throughput).

Memory is bounded by `max_pixels`: a decode never allocates more pixels than that (a decompression
bomb's header is read, and refused, before any pixel is decoded), and callers reduce each image to
the crop right after decoding it, so a batch never holds full-size images. No torch here: Ray Data's
CPU workers import this module and nothing heavier.
"""

from __future__ import annotations

import io
import math
import warnings

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile

# Decoded pixels allowed per image: 64 MP (8000 x 8000) takes a 50 MP camera's photo and stays below
# PIL's own bomb warning (89 MP); at 3 bytes a pixel it bounds one decode to 192 MB. A larger JPEG is
# still read when min_size lets libjpeg decode it at 1/2, 1/4 or 1/8: the limit is on decoded pixels.
MAX_PIXELS = 64_000_000

# Ray Data runs one task per CPU; OpenCV's own thread pool would oversubscribe the cores.
cv2.setNumThreads(1)

_JPEG_MAGIC = b"\xff\xd8"
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray")  # what libjpeg-turbo converts to RGB itself


class DecodeError(ValueError):
    """An image that cannot be decoded: names the file and says why, so it can be reported, never replaced."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"cannot decode {key!r}: {reason}")
        self.key = key
        self.reason = reason


def decode_image(
    data: bytes, *, key: str = "?", min_size: int | None = None, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 RGB; DecodeError naming `key` for anything else.

    min_size: the decoder may shrink a JPEG by 1/2, 1/4 or 1/8 as long as both sides stay >= min_size
    (a resize to that size follows anyway). None decodes at full size.
    """
    if not data:
        raise DecodeError(key, "zero-byte file")
    if data[:2] == _JPEG_MAGIC:
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise DecodeError(key, f"corrupt JPEG header ({e})") from None
        if colorspace in _SIMPLEJPEG_COLORSPACES:
            return _decode_jpeg(data, key, width, height, min_size, max_pixels)
    return _decode_pil(data, key, min_size, max_pixels)


def plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that libjpeg (or nvJPEG) turns into RGB itself, a YCbCr or grayscale
    one, from its header; None for anything else (CMYK, PNG, a header that does not parse)."""
    if data[:2] != _JPEG_MAGIC:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in _SIMPLEJPEG_COLORSPACES else None


def _decode_jpeg(data: bytes, key: str, width: int, height: int, min_size: int | None, max_pixels: int) -> np.ndarray:
    scale = _draft_scale(width, height, min_size)
    check_pixels(key, math.ceil(width / scale), math.ceil(height / scale), max_pixels)
    try:
        if scale == 1:
            return simplejpeg.decode_jpeg(data, colorspace="RGB")
        # Exactly 1/scale: left free, libjpeg picks 3/8 or 6/8 too, which decode slower than 1/2.
        return simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            min_height=math.ceil(height / scale),
            min_width=math.ceil(width / scale),
            min_factor=scale,
        )
    except ValueError as e:  # strict mode: libjpeg's "premature end of data" and friends
        raise DecodeError(key, f"truncated or corrupt JPEG ({e})") from None


def _draft_scale(width: int, height: int, min_size: int | None) -> int:
    """The largest of 1, 2, 4, 8 that keeps both sides >= min_size (libjpeg rounds sizes up)."""
    if not min_size:
        return 1
    return next(s for s in (8, 4, 2, 1) if s == 1 or math.ceil(min(width, height) / s) >= min_size)


def _decode_pil(data: bytes, key: str, min_size: int | None, max_pixels: int) -> np.ndarray:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With it on, PIL pads a cut-off file with grey and calls it good: exactly what must not happen.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; the decoder needs it "
            "off to tell truncated files from good ones"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(key, f"image too large ({e})") from None
    except Exception:  # UnidentifiedImageError, OSError, SyntaxError...: not a readable image
        raise DecodeError(key, f"not an image: {len(data)} bytes starting {data[:12]!r}") from None
    if min_size and img.format == "JPEG":
        scale = _draft_scale(*img.size, min_size)
        img.draft(img.mode, (math.ceil(img.size[0] / scale), math.ceil(img.size[1] / scale)))
    check_pixels(key, *img.size, max_pixels)
    try:
        img.load()
        return np.asarray(to_rgb(img))
    except Exception as e:
        raise DecodeError(key, f"truncated or corrupt {img.format} ({type(e).__name__}: {e})") from None


def check_pixels(key: str, width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """DecodeError naming `key` when decoding width x height pixels would pass max_pixels."""
    if width * height > max_pixels:
        raise DecodeError(
            key,
            f"image too large: {width} x {height} = {width * height:,} pixels to decode, above "
            f"the limit of {max_pixels:,} (decode.MAX_PIXELS)",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB. Transparent pixels hold arbitrary colour (often black): they are shown
    over white, as a viewer would; CMYK (Adobe-inverted handled by PIL), grayscale and palette
    images convert directly."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(
    height: int, width: int, *, resize_size: int, top: int, left: int, crop_size: int
) -> tuple[int, int, int, int]:
    """Where a crop_size patch at (top, left) of the image, rescaled so its shorter side is resize_size
    and cut to the central resize_size square (§2), lies in the image as it is: (y0, x0, y1, x1).

    Rounded to whole pixels of the image, so the patch may sit up to half a source pixel off and
    be up to one pixel larger or smaller before its resize (< 0.5% of a 224 crop).
    """
    scale = min(height, width) / resize_size  # image pixels per pixel of the 256 view
    y0 = (height - min(height, width)) / 2 + top * scale
    x0 = (width - min(height, width)) / 2 + left * scale
    side = max(1, round(crop_size * scale))
    y0, x0 = min(round(y0), height - side), min(round(x0), width - side)
    return y0, x0, y0 + side, x0 + side


def resized_crop(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool, out: np.ndarray | None = None
) -> np.ndarray:
    """The box (y0, x0, y1, x1) of image, resized to size x size (bilinear) and mirrored if flip.

    A box already size x size is sliced, not resampled. out: a (size, size, 3) uint8 array to fill.
    """
    y0, x0, y1, x1 = box
    region = image[y0:y1, x0:x1]
    if region.shape[:2] != (size, size):
        region = cv2.resize(region, (size, size), interpolation=cv2.INTER_LINEAR)
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    if flip:
        cv2.flip(region, 1, dst=out)
    else:
        out[...] = region
    return out
