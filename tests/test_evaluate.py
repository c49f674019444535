"""Top-k from counts, §4.1's ten crops and their averaged softmax, and the evaluation job checked against an
independent count."""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from pipeline.train.metrics import EvalSums, score_batch, topk_hits


def test_topk_counts_and_caps_k_at_the_class_count():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_hits(scores, labels, 1) == 1
    assert topk_hits(scores, labels, 2) == 2  # label 2 is second for row 1; label 0 is third for row 2
    assert topk_hits(scores, labels, 5) == 3  # only 3 classes: top-5 is every class


def test_sums_are_exact_counts_not_means_of_means():
    a, b = EvalSums(2.0, 1, 2, 2), EvalSums(6.0, 3, 3, 3)
    assert a.add(b).metrics() == {"val_loss": 8.0 / 5, "val_top1": 80.0, "val_top5": 100.0}


class Recorder(torch.nn.Module):
    """Logits that favour class 0 for flipped crops and class 1 otherwise, by the sign of a pixel."""

    def forward(self, x):
        sign = (x[:, 0, 0, 0] > 0).float()
        return torch.stack([sign * 3, (1 - sign) * 1, torch.zeros_like(sign)], dim=1)


def test_ten_crop_averages_the_softmax_over_the_patches():
    images = torch.zeros(1, 10, 4, 4, 3, dtype=torch.uint8)
    images[0, :3] = 255  # 3 of the 10 patches look like class 0, strongly; 7 like class 1, weakly
    sums = score_batch(Recorder(), images, torch.tensor([1]))
    p0 = torch.softmax(torch.tensor([3.0, 0.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
    mean = (3 * p0 + 7 * p1) / 10
    assert sums.correct1 == int(mean.argmax() == 1)
    assert abs(sums.loss - float(-mean[1].log())) < 1e-5
    single = score_batch(Recorder(), images[:, 0], torch.tensor([1]))  # one crop: the plain softmax
    assert single.correct1 == 0 and abs(single.loss - float(-p0[1].log())) < 1e-5


def test_ten_crop_is_four_corners_the_centre_and_their_mirrors():
    from pipeline.transforms import stages

    # Pixel values that encode their position: a crop's top-left pixel names where it was cut.
    size, crop = 10, 6
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    image = np.stack([rows, cols, rows * size + cols], axis=-1).astype(np.uint8)[None]  # (1, 10, 10, 3)
    crops = stages.ten_crop({"image": image}, size=crop)["image"][0]
    assert crops.shape == (10, crop, crop, 3)
    origins = [(int(c[0, 0, 0]), int(c[0, 0, 1])) for c in crops[:5]]
    assert origins == [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]  # corners, then the centre
    for plain, mirror in zip(crops[:5], crops[5:]):
        assert np.array_equal(mirror, plain[:, ::-1])
    assert len({c.tobytes() for c in crops}) == 10  # ten different patches


def test_eval_views_centre_is_trainings_view_and_the_square_is_the_resize(tiny_imagenet):
    from pipeline.experiments import evaluation
    from pipeline.transforms import stages

    paths = sorted((tiny_imagenet / "val").glob("*/*.JPEG"))[:3]
    batch = {
        "jpeg": [p.read_bytes() for p in paths] + [b"junk"],
        "key": [p.name for p in paths] + ["bad"],
        "label": np.array([0, 1, 2, 0]),
    }
    views = evaluation.eval_views(batch, resize_size=80, crop_size=67)
    assert list(views["failed"]) == ["bad"] and views["label"].tolist() == [0, 1, 2]
    want = stages.center_crops({"jpeg": batch["jpeg"][:3], "key": batch["key"][:3]}, resize_size=80, crop_size=67)
    assert np.array_equal(views["image"], want["image"])
    square = stages.resize_center(
        stages.decode({"jpeg": batch["jpeg"][:3], "key": batch["key"][:3]}, min_size=80), size=80
    )["image"]
    assert np.array_equal(views["square"], square) and views["square"].shape == (3, 80, 80, 3)


# A barely trained network gives near-equal probabilities; batches of another size round them differently
# (oneDNN picks its kernels by shape), so an image whose two best classes lie this close may flip.
TIE = 1e-4


class Counts(NamedTuple):
    images: int
    centre: int  # top-1 hits, centre crop
    ten: int  # top-1 hits, ten crops
    ties: int  # images whose ten-crop top two lie within TIE: either answer is right

    def agree(self, centre: int, ten: int) -> bool:
        return centre == self.centre and abs(ten - self.ten) <= self.ties


def independent_counts(model, root, *, resize_size: int, crop_size: int) -> Counts:
    """(images, centre top-1 hits, ten-crop top-1 hits, near-ties) by a plain loop: one image at a time,
    torchvision's own ten_crop, softmax averaged by hand. Shares only the pixel stages with the job."""
    import torchvision.transforms.functional as TF

    from pipeline.transforms import device_stages, stages

    wnids = sorted(p.name for p in (root / "train").iterdir())
    images = centre_hits = ten_hits = ties = 0
    for path in sorted((root / "val").glob("*/*.JPEG")):
        label = wnids.index(path.parent.name)
        row = {"jpeg": [path.read_bytes()], "key": [path.name]}
        centre = stages.center_crops(row, resize_size=resize_size, crop_size=crop_size)["image"]
        square = stages.resize_center(stages.decode(row, min_size=resize_size), size=resize_size)["image"]
        square = torch.from_numpy(square).permute(0, 3, 1, 2)[0]  # (3, S, S) uint8
        patches = torch.stack(TF.ten_crop(square, [crop_size, crop_size]))  # (10, 3, C, C)
        with torch.no_grad():
            p_centre = model(device_stages.normalize(device_stages.to_float(torch.from_numpy(centre)))).softmax(1)
            p_ten = model(device_stages.normalize(patches.float() / 255)).softmax(1).mean(0)
        images += 1
        centre_hits += int(p_centre[0].argmax() == label)
        ten_hits += int(p_ten.argmax() == label)
        top_two = p_ten.topk(2).values
        ties += int(top_two[0] - top_two[1] < TIE)
    return Counts(images, centre_hits, ten_hits, ties)


def test_evaluation_job_matches_an_independent_count_and_is_recorded(
    trained_run, mlflow_server, tiny_imagenet, monkeypatch
):
    import mlflow

    from pipeline.data import sources
    from pipeline.experiments import evaluation
    from pipeline.models import checkpoint

    cfg, summary = trained_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # where the job looks
    mlflow.set_tracking_uri(mlflow_server)
    reference = f"models:/{cfg.registered_model}@champion"
    opened = checkpoint.open_model(reference)
    result = evaluation.evaluate_split(opened.state, sources.open_source(str(tiny_imagenet)), batch_size=8)
    counts = independent_counts(
        checkpoint.build_model(opened.state), tiny_imagenet, resize_size=cfg.resize_size, crop_size=cfg.crop_size
    )
    assert counts.images == result["images"] == 24 and counts.ties <= 2, counts
    assert counts.agree(result["correct1"], result["correct1_10crop"]), (result, counts)
    assert result["metrics"]["val_top1"] == pytest.approx(100 * counts.centre / 24)
    assert result["metrics"]["val_top1_10crop"] == pytest.approx(100 * result["correct1_10crop"] / 24)

    # The job: the same numbers, written on the registered version and on its logged model.
    job = evaluation.evaluate_model(reference, str(tiny_imagenet))
    assert job["metrics"] == pytest.approx(result["metrics"])
    client = mlflow.MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(cfg.registered_model, "champion")
    for key in ("val_top1", "val_top5", "val_top1_10crop", "val_top5_10crop"):
        assert float(version.tags[key]) == pytest.approx(job["metrics"][key], abs=1e-4), key
    # The data training validated on: the centre crop reproduces that epoch's val_top1 exactly.
    trained = {m.step: m.value for m in client.get_metric_history(summary["run_id"], "val_top1")}
    assert job["metrics"]["val_top1"] == pytest.approx(trained[int(version.tags["epoch"])])
    logged = client.get_logged_model(version.tags["logged_model_id"])
    recorded = {m.key: m for m in logged.metrics if m.run_id != summary["run_id"]}
    assert recorded["val_top1_10crop"].value == pytest.approx(job["metrics"]["val_top1_10crop"])
    assert recorded["val_top1_10crop"].dataset_name == str(tiny_imagenet)


def test_evaluation_on_other_data_is_recorded_under_its_fingerprint(trained_run, mlflow_server, tmp_path, monkeypatch):
    """The trained run's model on a second data set with the same classes (another seed): its numbers go to
    eval/<fingerprint>/ tags, never over the val_top1 the champion rule compares."""
    import mlflow

    from pipeline.data import sources
    from pipeline.data.sample import generate_sample_imagenet
    from pipeline.experiments import evaluation
    from pipeline.models import checkpoint

    cfg, summary = trained_run
    other = generate_sample_imagenet(tmp_path / "other", num_classes=3, train_per_class=2, val_per_class=6, seed=7)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient(mlflow_server)
    version = summary["registration"].version  # this run's own version, by number
    before = client.get_model_version(cfg.registered_model, version).tags
    champion = client.get_model_version_by_alias(cfg.registered_model, "champion").version
    fingerprint = sources.open_source(str(other)).fingerprint
    assert fingerprint != before["data_fingerprint"]  # other data, by the measure the registry uses

    reference = f"models:/{cfg.registered_model}/{version}"
    job = evaluation.evaluate_model(reference, str(other))
    assert job["data_fingerprint"] == fingerprint and job["images"] == 18
    counts = independent_counts(
        checkpoint.build_model(checkpoint.open_model(reference).state),
        other,
        resize_size=cfg.resize_size,
        crop_size=cfg.crop_size,
    )
    assert counts.images == 18 and counts.ties <= 2, counts
    assert counts.agree(job["correct1"], job["correct1_10crop"]), (job, counts)
    centre = counts.centre

    after = client.get_model_version(cfg.registered_model, version).tags
    prefix = f"eval/{fingerprint[:12]}/"
    for key in ("val_top1", "val_top5", "val_top1_10crop", "val_top5_10crop"):
        assert float(after[prefix + key]) == pytest.approx(job["metrics"][key], abs=1e-4), key
    assert float(after[prefix + "val_top1"]) == pytest.approx(100 * centre / 18, abs=1e-4)
    assert after[prefix + "data_uri"] == str(other)
    # Nothing it measured stands in for the training measurement, and the champion did not move.
    assert {k: v for k, v in after.items() if not k.startswith(prefix)} == before
    assert client.get_model_version_by_alias(cfg.registered_model, "champion").version == champion
    # The logged model: the numbers as metrics of an evaluation run, tied to the other data.
    logged = client.get_logged_model(after["logged_model_id"])
    on_other = {m.key: m for m in logged.metrics if m.dataset_name == str(other)}
    assert on_other["val_top1_10crop"].value == pytest.approx(job["metrics"]["val_top1_10crop"])
    assert on_other["val_top1"].run_id != summary["run_id"]
    assert on_other["val_top1"].dataset_digest == fingerprint[:32]


def test_evaluation_job_reads_a_ray_checkpoint_and_refuses_other_classes(trained_run, tmp_path):
    import shutil

    from pipeline.experiments import evaluation

    cfg, summary = trained_run
    result = evaluation.evaluate_model(summary["checkpoint"], cfg.data, record=False)
    assert result["epoch"] == 1 and result["recorded"] == []
    assert result["metrics"]["val_top1"] == pytest.approx(summary["val_top1"])  # training's own view of epoch 1

    fewer = tmp_path / "two-classes"
    for split in ("train", "val"):
        for wnid in sorted(p.name for p in (Path(cfg.data) / split).iterdir())[:2]:
            shutil.copytree(Path(cfg.data) / split / wnid, fewer / split / wnid)
    with pytest.raises(ValueError, match=r"the model has 3 classes but .*two-classes has 2"):
        evaluation.evaluate_model(summary["checkpoint"], str(fewer), record=False)


@pytest.mark.slow  # a job in a subprocess
def test_evaluation_job_names_a_model_it_cannot_find(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parents[1] / "jobs" / "evaluate.py"), "--model", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"no checkpoint at '{missing}'" in result.stderr


# --- counting on the device, reducing on the process group's device (issue 16, items 2 and 6) ---------------


class FixedLogits(torch.nn.Module):
    """Ignores the pixels and returns the logits it was given, one row per image."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = torch.from_numpy(logits)

    def forward(self, x):
        return self.logits


def test_batch_counts_per_class_equal_an_independent_numpy_count():
    from pipeline.train.metrics import batch_counts, sums_of

    rng = np.random.default_rng(5)
    classes, n = 9, 60
    logits = rng.integers(0, 4, (n, classes)).astype(np.float32)  # small integers: many tied maxima
    labels = rng.integers(0, 7, n)  # repeated labels; classes 7 and 8 unseen
    sums = sums_of(
        batch_counts(FixedLogits(logits), torch.zeros(n, 2, 2, 3, dtype=torch.uint8), torch.from_numpy(labels))
    )

    # A hit is the label being the one class top-1 picks (topk_hits' rule). Where the maximum is unique
    # that is NumPy's argmax; where it is tied, torch's pick among the tied classes decides.
    tied = (logits == logits.max(1, keepdims=True)).sum(1) > 1
    picked = torch.from_numpy(logits).softmax(1).topk(1).indices[:, 0].numpy()
    assert np.array_equal(picked[~tied], logits[~tied].argmax(1))
    assert (tied & (logits[np.arange(n), labels] == logits.max(1))).any()  # ties on the label happen here
    hit = picked == labels
    assert sums.class_images == tuple(int((labels == c).sum()) for c in range(classes))
    assert sums.class_correct1 == tuple(int(hit[labels == c].sum()) for c in range(classes))
    assert sums.images == n and sums.correct1 == int(hit.sum()) == sum(sums.class_correct1)
    assert sums.class_images[7:] == (0, 0)


@pytest.fixture
def one_process_group():
    """A real torch.distributed process group of one gloo worker, destroyed after the test."""
    import torch.distributed as dist

    from conftest import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_all_reduce_runs_on_the_workers_device_and_reads_back_once(one_process_group, monkeypatch):
    """NCCL serves CUDA tensors only: the tensor handed to all_reduce must be on the worker's device, and
    the result is read from it once (each read waits for the device)."""
    import torch.distributed as dist

    real, devices, reads = dist.all_reduce, [], []

    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or tolist(self))
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append("item") or pytest.fail("item() read"))

    sums = EvalSums(2.5, 3, 4, 5, (2, 3, 0), (1, 2, 0))
    assert sums.all_reduce(classes=3, device=torch.device("cpu")) == sums  # one worker: its own sums
    assert devices == [torch.device("cpu")] and reads == ["tolist"]
    # A worker that scored no batch sends zeros of the full length; without classes none are kept.
    assert EvalSums(1.0, 1, 1, 1).all_reduce(classes=3, device="cpu").class_images == (0, 0, 0)
    assert sums.all_reduce(device="cpu") == EvalSums(2.5, 3, 4, 5)
