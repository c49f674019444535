"""The late float stages: §4.1 lighting against a NumPy reference, each parameter's effect, and the
one-pass to_model_input equal to the chain it replaces. Decoding on the device, run here on the CPU: the
CPU path's crops, a file the device's decoder refuses retried by the CPU decoder, and the order of the
CUDA decode's streams (stubbed)."""

import contextlib

import numpy as np
import pytest
import torch

from pipeline.transforms import constants, device_stages, stages


def numpy_lighting(images: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """fb.resnet.torch's Lighting, one image at a time: rgb = eigvec @ (alpha * eigval)."""
    eigval, eigvec = np.array(constants.IMAGENET_EIGVAL), np.array(constants.IMAGENET_EIGVEC)
    out = images.copy()
    for i in range(len(images)):
        rgb = eigvec @ (alpha[i] * eigval)
        out[i] += rgb[:, None, None]
    return out


def test_pca_lighting_matches_numpy_reference():
    x = torch.rand(5, 3, 4, 4)
    out = device_stages.pca_lighting(x, torch.Generator().manual_seed(3), std=0.1)
    alpha = (torch.randn(5, 3, generator=torch.Generator().manual_seed(3)) * 0.1).numpy()
    np.testing.assert_allclose(out.numpy(), numpy_lighting(x.numpy(), alpha), rtol=1e-5, atol=1e-6)
    # One colour shift per image, the same at every pixel.
    shift = (out - x).reshape(5, 3, -1)
    assert torch.allclose(shift, shift[:, :, :1].expand_as(shift), atol=1e-6)


def test_pca_lighting_std_scales_the_noise_and_zero_disables_it():
    x = torch.rand(400, 3, 2, 2)
    small = (device_stages.pca_lighting(x, torch.Generator().manual_seed(0), std=0.1) - x).std()
    large = (device_stages.pca_lighting(x, torch.Generator().manual_seed(0), std=0.2) - x).std()
    assert large / small == pytest.approx(2.0, rel=1e-4)
    assert torch.equal(device_stages.pca_lighting(x, torch.Generator(), std=0.0), x)


def test_to_float_and_normalize():
    images = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = device_stages.to_float(images)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32 and x.max() == 1.0
    y = device_stages.normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("lighting_std", [0.1, 0.0])
def test_to_model_input_is_the_chain_in_one_pass(lighting_std):
    images = torch.randint(0, 256, (6, 9, 7, 3), dtype=torch.uint8)  # height 9, width 7: nothing square
    chain = device_stages.normalize(
        device_stages.pca_lighting(device_stages.to_float(images), torch.Generator().manual_seed(1), std=lighting_std)
    )
    fused = device_stages.to_model_input(images, torch.Generator().manual_seed(1), lighting_std=lighting_std)
    assert fused.shape == (6, 3, 9, 7) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, chain, rtol=1e-5, atol=1e-5)
    if lighting_std:  # and the lighting is really there: another seed, another image
        other = device_stages.to_model_input(images, torch.Generator().manual_seed(2), lighting_std=lighting_std)
        assert not torch.allclose(other, fused)


# --- decoding on the device (run here on the CPU; the same calls on CUDA use nvJPEG) -----------


def test_device_decode_and_crops_match_the_cpu_path():
    """Same crop draws, same boxes: torchvision's decoder + torch's bilinear resize give the CPU
    path's crops (libjpeg-turbo + OpenCV) to within a grey level or two."""
    import io

    import cv2
    from PIL import Image

    from pipeline.data.sample import photo_like

    files = []
    for i, size in enumerate([(500, 375), (375, 500), (300, 200), (256, 256)]):
        buf = io.BytesIO()
        smooth = cv2.GaussianBlur(photo_like(np.random.default_rng(i), *size), (0, 0), 1.0)
        Image.fromarray(smooth).save(buf, "JPEG", quality=92)
        files.append(buf.getvalue())
    keys = [f"k{i}" for i in range(4)]
    cpu = stages.random_crops({"jpeg": files, "key": keys}, np.random.default_rng(9), resize_size=256, crop_size=224)
    top, left, flip = stages.crop_params(4, np.random.default_rng(9), resize_size=256, crop_size=224, flip_p=0.5)
    images, rows, failed = device_stages.decode_on_device(files, keys, "cpu")
    assert rows == [0, 1, 2, 3] and failed == {}
    device = device_stages.crops_on_device(images, top, left, flip, resize_size=256, crop_size=224)
    assert device.shape == (4, 224, 224, 3) and device.dtype == torch.uint8
    diff = device.numpy().astype(int) - cpu["image"].astype(int)
    assert np.abs(diff).mean() < 1.5 and np.abs(diff).max() <= 16, (np.abs(diff).mean(), np.abs(diff).max())


def test_device_decode_falls_back_per_image_and_names_failures():
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)

    def saved(mode, fmt):
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, fmt)
        return buf.getvalue()

    good, cmyk, png = saved("RGB", "JPEG"), saved("CMYK", "JPEG"), saved("RGB", "PNG")
    jpegs = [good, cmyk, b"", good[: len(good) // 2], png]
    images, rows, failed = device_stages.decode_on_device(jpegs, list("abcde"), "cpu")
    assert rows == [0, 1, 4] and [tuple(im.shape) for im in images] == [(3, 40, 60)] * 3
    assert torch.equal(images[2].permute(1, 2, 0), torch.from_numpy(pixels))  # the PNG, lossless, by the CPU decoder
    assert set(failed) == {"c", "d"} and failed["c"] == "zero-byte file" and "JPEG" in failed["d"]
    big = device_stages.decode_on_device([good], ["big"], "cpu", max_pixels=100)[2]
    assert big["big"].startswith("image too large: 60 x 40")


def test_a_file_the_device_decoder_refuses_is_decoded_by_the_cpu_decoder(monkeypatch):
    """nvJPEG reads fewer JPEG variants than libjpeg (chroma subsamplings): a file it refuses is retried
    on the CPU, and only a file both refuse is named in `failed`, with the CPU decoder's reason."""
    import io

    import torchvision.io
    from PIL import Image

    from pipeline.transforms import decode

    pixels = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)

    def saved(**options):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", **options)
        return buf.getvalue()

    plain, refused = saved(quality=90), saved(quality=80, subsampling=1)  # 4:2:2, as nvJPEG might refuse
    corrupt = plain[: len(plain) // 2]

    real, offered = torchvision.io.decode_jpeg, []

    def device_decoder(encoded, *args, **kwargs):  # the real decoder, refusing `refused` as nvJPEG would
        files = [bytes(e.numpy()) for e in (encoded if isinstance(encoded, list) else [encoded])]
        offered.extend(files)
        if refused in files:
            raise RuntimeError("Error while decoding JPEG images: simulated nvJPEG refusal")
        return real(encoded, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", device_decoder)

    images, rows, failed = device_stages.decode_on_device([plain, refused, corrupt], list("abc"), "cpu")
    assert refused in offered  # the device's decoder was asked first
    assert rows == [0, 1] and list(failed) == ["c"]
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(decode.decode_image(refused)))
    assert failed["c"].startswith("truncated or corrupt JPEG")  # the CPU decoder's words


def test_stream_reuse_check_has_nothing_to_check_on_the_cpu():
    result = device_stages.stream_reuse_check("cpu")
    assert result["corrupted"] == 0 and result["iterations"] == 0 and "CUDA" in result["note"]


def test_cuda_decode_runs_on_its_own_stream_and_hands_the_outputs_to_the_callers(monkeypatch, request):
    """The order _decode_on_stream keeps on CUDA (pytorch/vision PR #9606), with the CUDA calls stubbed:
    decode_jpeg runs while the decode stream is current (its outputs come from that stream's pool), then
    the caller's stream waits for it and every output is recorded as used by the caller's stream."""
    import torchvision.io

    events, current = [], []

    class Stream:
        def __init__(self, name, device_index=0):
            self.name, self.device_index = name, device_index

        def wait_stream(self, other):
            events.append(("wait", self.name, other.name))

    class Image:
        def __init__(self, i):
            self.i = i

        def record_stream(self, stream):
            events.append(("record", self.i, stream.name))

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        yield
        current.pop()

    def decode_jpeg(encoded, **kwargs):
        events.append(("decode", current[-1].name))
        return [Image(i) for i in range(len(encoded))]

    current.append(Stream("caller"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("decode", device))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    device_stages._decode_stream.cache_clear()
    request.addfinalizer(device_stages._decode_stream.cache_clear)  # it would hold a stub stream
    out = device_stages._decode_on_stream([torch.zeros(1, dtype=torch.uint8)] * 2, torch.device("cuda", 0))
    assert [image.i for image in out] == [0, 1]
    assert events == [
        ("decode", "decode"),
        ("wait", "caller", "decode"),
        ("record", 0, "caller"),
        ("record", 1, "caller"),
    ]
    assert current[-1].name == "caller"
