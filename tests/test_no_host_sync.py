"""What a CPU can see of README's "no step waits for the device": the per-batch code calls nothing that
makes the host wait for a CUDA device, and builds its constants once.

    would wait for a CUDA device                 caught here by
    torch.bincount, nonzero, unique, boolean-    spies that raise, around metrics.batch_counts (CPU) and
      mask indexing, .item / .tolist / .cpu,       to_model_input (on the meta device: tensors without data,
      torch.tensor(..., device=...)                where any data-dependent op raises anyway)
    a blocking copy to the device each step      to_model_input's copies to the meta device, recorded
    a pageable non_blocking copy                 to_device with pin_memory and .to recorded (CUDA stubbed)

The proof is on a GPU: the same calls under torch.cuda.set_sync_debug_mode("error") (jobs/gpu_check.py).
"""

import contextlib

import pytest
import torch

from pipeline.train import metrics
from pipeline.transforms import constants, device_stages

META = torch.device("meta")


@contextlib.contextmanager
def host_reads_refused():
    """Every call that would make the host wait for a CUDA device raises, naming itself."""

    def refuse(name):
        def refused(*args, **kwargs):
            raise AssertionError(f"{name} makes the host wait for the device")

        return refused

    getitem, tensor = torch.Tensor.__getitem__, torch.tensor

    def no_mask(self, index):
        if any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (index if isinstance(index, tuple) else (index,))
        ):
            raise AssertionError("boolean-mask indexing makes the host wait for the device")
        return getitem(self, index)

    def no_device(*args, **kwargs):
        if kwargs.get("device") is not None:
            raise AssertionError("torch.tensor(..., device=...) is a blocking copy")
        return tensor(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("bincount", "nonzero", "unique"):
            mp.setattr(torch, name, refuse(f"torch.{name}"))
        for name in ("item", "tolist", "cpu", "numpy", "nonzero", "unique", "__bool__"):
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        mp.setattr(torch.Tensor, "__getitem__", no_mask)
        mp.setattr(torch, "tensor", no_device)
        yield


@pytest.mark.parametrize("crops", [1, 10])
def test_batch_counts_calls_nothing_that_waits_for_the_device(crops):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    shape = (6, crops, 4, 4, 3) if crops > 1 else (6, 4, 4, 3)
    images, labels = torch.randint(0, 256, shape, dtype=torch.uint8), torch.tensor([0, 1, 1, 3, 3, 3])
    with torch.no_grad(), host_reads_refused():
        counts = metrics.batch_counts(model, images, labels)
    sums = metrics.sums_of(counts)  # read once, after the pass
    assert sums.images == 6 and sums.class_images == (1, 2, 0, 3, 0)


def test_to_model_input_copies_only_the_lighting_shift_and_builds_its_constants_once(monkeypatch):
    device_stages._row_constants.cache_clear()
    to, copies = torch.Tensor.to, []

    def recorded_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            copies.append((tuple(self.shape), kwargs.get("non_blocking", False)))
        return out

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)

    images = torch.empty(8, 9, 7, 3, dtype=torch.uint8, device=META)
    with host_reads_refused():
        x = device_stages.to_model_input(images, torch.Generator().manual_seed(0))
        built = len(copies)  # the first call for this device and width: the constants
        device_stages.to_model_input(images, torch.Generator().manual_seed(0))
        device_stages.to_model_input(images, torch.Generator(), lighting_std=0.0)
    assert x.shape == (8, 3, 9, 7) and x.device == META
    assert device_stages._row_constants.cache_info().currsize == 1
    # Later calls: the (8, 3) lighting shift alone, without blocking; none at all without lighting.
    assert copies[built:] == [((8, 3), True)]


def test_normalize_builds_its_constants_once_per_device_and_dtype():
    device_stages._channel_constants.cache_clear()
    x = torch.rand(2, 3, 4, 4)
    first = device_stages.normalize(x)
    assert torch.equal(device_stages.normalize(x), first)
    device_stages.normalize(torch.empty(2, 3, 4, 4, device=META))
    info = device_stages._channel_constants.cache_info()
    assert (info.currsize, info.hits) == (2, 1)  # CPU float32 once, used twice; meta once


def test_to_device_pins_before_a_non_blocking_copy_to_cuda(monkeypatch):
    """A non_blocking copy from pageable memory is still synchronous: to CUDA the tensor is pinned first
    (CUDA stubbed out here: pin_memory and .to only record)."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: calls.append((args, kwargs)) or self)
    device_stages.to_device(torch.zeros(3), "cuda")
    assert calls == ["pin", ((torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    device_stages.to_device(torch.zeros(3), "cpu")  # pin_memory needs CUDA: never for another device
    assert "pin" not in calls


def test_constants_first_built_under_inference_mode_serve_a_caller_that_needs_gradients():
    """The serving actors run in inference_mode; a cache they filled must not hand training inference
    tensors, which autograd refuses to save for backward."""
    device_stages._channel_constants.cache_clear()
    with torch.inference_mode():
        device_stages.normalize(torch.rand(1, 3, 2, 2))
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    device_stages.normalize(x).sum().backward()
    assert torch.allclose(x.grad, 1 / torch.tensor(constants.IMAGENET_STD)[None, :, None, None].expand(1, 3, 2, 2))
