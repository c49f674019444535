"""The config: presets, the generated command line, and clear refusals of bad input."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import Config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_default_is_the_sample_preset_and_paper_is_the_paper():
    assert parse_args([]) == config.PRESETS["sample"]
    paper = parse_args(["--preset", "paper"])
    assert (paper.batch_size, paper.lr, paper.momentum, paper.weight_decay, paper.epochs) == (128, 0.01, 0.9, 5e-4, 90)
    assert (paper.schedule, paper.lr_gamma, paper.width, paper.model) == ("plateau", 0.1, 1.0, "alexnet")
    tv = parse_args(["--preset", "torchvision"])
    assert (tv.model, tv.crop_size, tv.batch_size, tv.weight_decay, tv.schedule) == ("torchvision", 224, 256, 1e-4, "step")


def test_flags_override_the_preset_whatever_their_order():
    cfg = parse_args(["--epochs", "3", "--preset", "paper", "--no-use-gpu", "--lr", "0.05"])
    assert (cfg.preset, cfg.epochs, cfg.lr, cfg.batch_size, cfg.use_gpu) == ("paper", 3, 0.05, 128, False)
    assert parse_args(["--use-gpu"]).use_gpu is True


def test_every_field_is_a_documented_flag():
    help_text = config.build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert f.metadata["help"]


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--epoch", "3"], "unrecognized arguments"),  # no silent abbreviation of --epochs
    (["--epochs", "three"], "invalid int value"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "63"], "must divide evenly across --workers 2"),
    (["--crop-size", "300"], "must not exceed --resize-size"),
    (["--preset", "huge"], "invalid choice"),
    (["--flip-p", "1.5"], "--flip-p must be in [0, 1]"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--log-models", "some"], "invalid choice: 'some'"),
])
def test_bad_flags_exit_with_a_message_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_config_is_frozen_and_worker_batch_is_the_global_batch_split():
    cfg = Config(batch_size=128, workers=4)
    assert cfg.worker_batch_size == 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1


def test_train_help_and_unknown_flag_answer_without_starting_anything():
    help_run = subprocess.run([sys.executable, "jobs/train.py", "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    assert help_run.returncode == 0 and "--registered-model" in help_run.stdout
    bad = subprocess.run([sys.executable, "jobs/train.py", "--wrokers", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --wrokers" in bad.stderr


def test_default_tracking_store_is_local_and_survives_ray_job_working_dirs(tmp_path, monkeypatch):
    from pipeline.tracking.runs import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri() == "http://mlflow:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'alexnet-ray' / 'mlflow.db'}"


def test_worker_cpus_leave_ray_data_a_cpu_or_refuse():
    from pipeline.cluster import worker_resources

    sample = config.PRESETS["sample"]
    assert worker_resources(sample, free_cpus=4) == {"CPU": 1.0}      # local: 2 cores + 2 logical
    assert worker_resources(sample, free_cpus=2) == {"CPU": 0.5}      # `ray start --head` on 2 cores
    with pytest.raises(ValueError, match="leaves Ray Data 0 CPU"):
        worker_resources(dataclasses.replace(sample, cpus_per_worker=1.0), free_cpus=2)
    # A shared cluster: what other jobs hold is not ours to plan with, and the message says both numbers.
    with pytest.raises(ValueError, match=r"^1 of the cluster's 8 CPUs free: too few for 2 train workers"):
        worker_resources(sample, free_cpus=1, total_cpus=8)
    with pytest.raises(ValueError, match=r"2 train workers x 1 CPU with 2 of the cluster's 8 CPUs free leaves Ray "
                                         r"Data 0 CPU"):
        worker_resources(dataclasses.replace(sample, cpus_per_worker=1.0), free_cpus=2, total_cpus=8)
    gpu = dataclasses.replace(sample, use_gpu=True)
    assert worker_resources(gpu, 0) == {"CPU": 1.0, "GPU": 1.0}
    assert worker_resources(dataclasses.replace(gpu, placement="grouped"), 0)["GPU"] == 2.0
