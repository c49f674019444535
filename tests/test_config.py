"""The config: presets, the generated command line, and clear refusals of bad input."""

import dataclasses
import os
import re
import shutil
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
    assert (tv.model, tv.crop_size, tv.batch_size, tv.weight_decay, tv.schedule) == (
        "torchvision",
        224,
        256,
        1e-4,
        "step",
    )


def test_flags_override_the_preset_whatever_their_order():
    cfg = parse_args(["--epochs", "3", "--preset", "paper", "--no-use-gpu", "--lr", "0.05"])
    assert (cfg.preset, cfg.epochs, cfg.lr, cfg.batch_size, cfg.use_gpu) == ("paper", 3, 0.05, 128, False)
    assert parse_args(["--use-gpu"]).use_gpu is True


def test_every_field_is_a_documented_flag():
    help_text = config.build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name.replace('_', '-')}" in help_text
        assert f.metadata["help"]


@pytest.mark.parametrize(
    "argv,message",
    [
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
    ],
)
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
    help_run = subprocess.run(
        [sys.executable, "jobs/train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0 and "--registered-model" in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/train.py", "--wrokers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
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
    assert worker_resources(sample, free_cpus=4) == {"CPU": 1.0}  # local: 2 cores + 2 logical
    assert worker_resources(sample, free_cpus=2) == {"CPU": 0.5}  # `ray start --head` on 2 cores
    with pytest.raises(ValueError, match="leaves Ray Data 0 CPU"):
        worker_resources(dataclasses.replace(sample, cpus_per_worker=1.0), free_cpus=2)
    # A shared cluster: what other jobs hold is not ours to plan with, and the message says both numbers.
    with pytest.raises(ValueError, match=r"^1 of the cluster's 8 CPUs free: too few for 2 train workers"):
        worker_resources(sample, free_cpus=1, total_cpus=8)
    with pytest.raises(
        ValueError,
        match=r"2 train workers x 1 CPU with 2 of the cluster's 8 CPUs free leaves Ray "
        r"Data 0 CPU",
    ):
        worker_resources(dataclasses.replace(sample, cpus_per_worker=1.0), free_cpus=2, total_cpus=8)
    gpu = dataclasses.replace(sample, use_gpu=True)
    assert worker_resources(gpu, 0) == {"CPU": 1.0, "GPU": 1.0}
    assert worker_resources(dataclasses.replace(gpu, placement="grouped"), 0)["GPU"] == 2.0


def test_every_field_is_in_exactly_one_help_group_and_help_shows_the_groups():
    parser = config.build_parser()
    assert {f.metadata["group"] for f in dataclasses.fields(Config)} == set(config.GROUPS)  # no group left empty
    help_text = parser.format_help()
    sections = {title: help_text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0] for title in config.GROUPS.values()}
    for f in dataclasses.fields(Config):
        flag = re.compile(rf"^  --{f.name.replace('_', '-')}[ ,\n]", re.M)  # where it is defined, not named
        assert [title for title, text in sections.items() if flag.search(text + "\n")] == [
            config.GROUPS[f.metadata["group"]]
        ]
    assert "--lighting {on,off}" in sections[config.GROUPS["switch"]]
    assert "(default: 5)" in sections["recipe (§5)"]  # the sample preset's epochs, stated in words


def test_a_flag_given_wins_over_its_preset_and_the_namespace_holds_only_flags_given():
    parser = config.build_parser()
    args = parser.parse_args(["--lr", "0.02", "--preset", "paper", "--no-use-gpu"])
    assert vars(args) == {"lr": 0.02, "preset": "paper", "use_gpu": False}
    assert config.from_namespace(args) == dataclasses.replace(config.PRESETS["paper"], lr=0.02)


# Each job and a flag no job has: argparse's own refusal, exit 2, before anything starts.
JOBS = [
    ("train.py",),
    ("ablate.py",),
    ("evaluate.py", "--model", "m"),
    ("prepare_imagenet.py", "a", "b"),
    ("benchmark.py", "gpu"),
    ("benchmark.py", "data"),
    ("gpu_check.py",),
]


@pytest.mark.slow  # a job in a subprocess
@pytest.mark.parametrize("job", JOBS, ids=" ".join)
def test_every_job_refuses_an_unknown_flag(job):
    run = subprocess.run(
        [sys.executable, f"jobs/{job[0]}", *job[1:], "--no-such-flag"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].endswith(
        "error: unrecognized arguments: --no-such-flag"
    ), run.stderr[-2000:]


def run_from_a_clone(clone: Path, job: str, *args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """`python <clone>/jobs/<job> args` from another folder, as an uninstalled clone runs it: the venv's editable
    finder (which maps `pipeline` to this checkout) is taken out, and sys.path[0] is the script's folder, as
    Python sets it for a script; prints, last, where `pipeline` was imported from."""
    script = clone / "jobs" / job
    code = (
        "import runpy, sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f) + type(f).__module__]\n"
        f"sys.path[0] = {str(script.parent)!r}\n"
        f"sys.argv = {[str(script), *args]!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(sys.modules['pipeline'].__file__ if 'pipeline' in sys.modules else None)\nsys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", code], cwd=clone.parent, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.mark.slow  # a job in a subprocess
def test_jobs_import_pipeline_from_their_clone_uninstalled(tmp_path):
    """The bootstrap decision. gpu_check.py and benchmark.py (gpu) run on a lent GPU machine from a clone that is
    not installed: they put the clone's root on sys.path themselves. The jobs that need Ray do not: under `ray job
    submit --working-dir .` Ray puts the uploaded folder first on the driver's PYTHONPATH
    (ray/_private/runtime_env/working_dir.py, set_pythonpath_in_context), elsewhere the package is installed."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "jobs", clone / "jobs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "pipeline", clone / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    run = run_from_a_clone(clone, "gpu_check.py", "--help")  # benchmark.py imports pipeline only after parsing
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == str(clone / "pipeline" / "__init__.py")
    bare = run_from_a_clone(clone, "train.py", "--help")  # the editable finder is really out of the way
    assert bare.returncode == 1 and "No module named 'pipeline'" in bare.stderr
    as_ray_runs_it = run_from_a_clone(clone, "train.py", "--help", pythonpath=str(clone))
    assert as_ray_runs_it.returncode == 0 and "checkpoints and restarts:" in as_ray_runs_it.stdout
    assert as_ray_runs_it.stdout.strip().splitlines()[-1] == str(clone / "pipeline" / "__init__.py")
