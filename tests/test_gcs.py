"""gs:// wherever s3:// works, against a real emulator (fake-gcs-server, conftest.gcs_server): a folder and prepared
shards on GCS read the same rows as their local copies; the prepare job writes its shards there; a checkpoint there
opens for evaluation; a missing bucket, a store that does not answer and absent credentials are answered in one line;
reads through a store that throttles and drops connections (tests/fault_proxy.py, in a process of its own) give the
same rows and count their retries."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from test_checkpoint import save, trained_parts
from test_storage_faults import read_everything

from conftest import ROOT, free_port
from pipeline import errors
from pipeline.data import prepare, sources, storage
from pipeline.models import checkpoint

RATES = {"slow_down": 0.05, "reset": 0.01, "truncate": 0.02}
# GCS's own answer when it throttles or fails (a JSON error, not S3's XML): the proxy serves it for slow_down.
GCS_503 = {
    "error": {
        "code": 503,
        "message": "Backend Error",
        "errors": [{"message": "Backend Error", "domain": "global", "reason": "backendError"}],
    }
}


def make_bucket(endpoint: str, name: str) -> str:
    host = endpoint.removeprefix("http://")
    pafs.GcsFileSystem(anonymous=True, scheme="http", endpoint_override=host, project_id="test").create_dir(name)
    return f"gs://{name}"


def upload_folder(folder: Path, uri: str) -> None:
    fs, root = storage.resolve(uri)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_bytes(fs, storage.join(root, path.relative_to(folder).as_posix()), path.read_bytes())


@pytest.fixture(scope="module")
def uris(ray_session, gcs_server, tiny_imagenet, tmp_path_factory):
    """The tiny data set on GCS as a folder, and as shards the prepare job wrote there (beside a local run's)."""
    bucket = make_bucket(gcs_server, "tiny")
    upload_folder(tiny_imagenet, f"{bucket}/folder")
    local = str(tmp_path_factory.mktemp("shards") / "shards")
    manifests = {
        where: prepare.prepare(str(tiny_imagenet), out, target_mb=0.05, log=lambda m: None)
        for where, out in (("local", local), ("gcs", f"{bucket}/shards"))
    }
    return {"folder": f"{bucket}/folder", "shards": f"{bucket}/shards", "local shards": local, **manifests}


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_data_on_gcs_reads_the_same_rows_as_its_local_copy(uris, tiny_imagenet, layout):
    local = str(tiny_imagenet) if layout == "folder" else uris["local shards"]
    source = sources.open_source(uris[layout])
    assert source.uri == uris[layout] and source.kind == sources.open_source(local).kind
    rows = read_everything(uris[layout])
    assert len(rows) == 96 and rows == read_everything(local)


def test_the_prepare_job_writes_to_gcs_the_shards_it_writes_locally(uris, tiny_imagenet):
    shards_of = {
        w: [(s["path"], s["rows"], s["sha256"]) for s in uris[w]["splits"]["train"]["shards"]] for w in ("local", "gcs")
    }
    assert len(shards_of["gcs"]) > 1 and shards_of["gcs"] == shards_of["local"]  # the same bytes, shard for shard
    fs, root = storage.resolve(uris["shards"])
    assert storage.read_bytes(fs, storage.join(root, "manifest.json"))
    # A re-run completes a partial output: every shard there checks out (sidecar + sha256 read back from GCS).
    again = prepare.prepare(str(tiny_imagenet), uris["shards"], target_mb=0.05, log=lambda m: None)
    assert again["splits"] == uris["gcs"]["splits"]


def test_a_checkpoint_on_gcs_opens_for_evaluation(uris, tmp_path):
    model, optimizer, scheduler = trained_parts()
    save(tmp_path, model, optimizer, scheduler)
    upload_folder(tmp_path, "gs://tiny/checkpoints/epoch-4")
    for reference in ("gs://tiny/checkpoints/epoch-4", f"gs://tiny/checkpoints/epoch-4/{checkpoint.CHECKPOINT_FILE}"):
        storage.check_location(reference, "--model", must_exist=True)
        opened = checkpoint.open_model(reference, storage.resolve(reference)[0])  # as evaluation.evaluate_model
        assert opened.state["epoch"] == 4 and opened.reference == reference


def test_ray_train_keeps_its_checkpoints_on_gcs_through_train_filesystem(uris):
    """What the driver does with --storage-path gs://...: RunConfig(storage_path=, storage_filesystem=) from
    storage.train_filesystem (Ray's own resolution of gs:// knows no emulator)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def report_two_checkpoints(config):  # here, not at the top: Ray's workers cannot import this test module
        for epoch in range(2):
            with tempfile.TemporaryDirectory() as directory:
                Path(directory, "epoch.txt").write_text(str(epoch))
                ray.train.report({"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(directory))

    assert storage.train_filesystem("s3://b/ray_results") == (None, "s3://b/ray_results")
    filesystem, path = storage.train_filesystem("gs://tiny/ray_results")
    assert path == "tiny/ray_results" and filesystem.type_name == "py::gs-retrying"
    trainer = TorchTrainer(
        report_two_checkpoints,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(
            name="run",
            storage_path=path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        assert Path(directory, "epoch.txt").read_text() == "1"
    fs, _ = storage.resolve("gs://tiny")
    kept = fs.get_file_info(pafs.FileSelector("tiny/ray_results/run", recursive=True))
    assert sum(info.base_name == "epoch.txt" for info in kept) == 1  # the older one deleted from the bucket


def one_line(error: BaseException) -> str:
    line = errors.describe(error)
    assert line is not None and "\n" not in line and "error_info" not in line, line
    return line


def test_a_missing_bucket_a_dead_endpoint_and_no_credentials_are_answered_in_one_line(
    gcs_server, monkeypatch, tmp_path
):
    with pytest.raises(FileNotFoundError) as missing:
        storage.check_location("gs://no-such-bucket/x", "dataset path")
    assert one_line(missing.value) == (
        f"dataset path gs://no-such-bucket/x: bucket 'no-such-bucket' does not exist at {gcs_server}: create it, "
        f"or correct the name"
    )
    fs, _ = storage.resolve("gs://tiny")
    with pytest.raises(FileNotFoundError) as object_missing:
        storage.read_bytes(fs, "tiny/folder/nothing.jpeg")
    assert one_line(object_missing.value).startswith("gs://tiny/folder/nothing.jpeg does not exist")
    with pytest.raises(FileNotFoundError) as write_missing:
        storage.write_bytes(fs, "no-such-bucket/x.json", b"{}")
    assert "gs://no-such-bucket/x.json cannot be written: its bucket does not exist" in one_line(write_missing.value)

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
    started = time.perf_counter()
    with pytest.raises(OSError) as unreachable:
        storage.check_location("gs://tiny/folder", "dataset path", must_exist=True)
    assert time.perf_counter() - started < 10
    assert one_line(unreachable.value).startswith(f"object storage does not answer at {dead} (")
    assert "STORAGE_EMULATOR_HOST" in one_line(unreachable.value)

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))  # never real GCS from here
    with pytest.raises(Exception) as no_credentials:
        storage.check_location("gs://tiny/folder", "dataset path")
    line = one_line(no_credentials.value)
    assert line.startswith("no Google Cloud credentials could be used (Cannot open credentials file"), line
    assert storage.transient_cause(no_credentials.value) is None  # a read fails at once, not after 8 attempts


# GCS's JSON errors as google-cloud-cpp words them in pyarrow's OSError (the emulator says "Not Found" for everything).
NO_BUCKET = (
    "google::cloud::Status(NOT_FOUND: Permanent error, with a last message of The specified bucket does not exist. "
    "error_info={reason=notFound, domain=global, metadata={gcloud-cpp.retry.function=CreateResumableUpload, "
    "gcloud-cpp.retry.reason=permanent-error, http_status_code=404}})"
)
DENIED = (
    "google::cloud::Status(PERMISSION_DENIED: Permanent error, with a last message of sa@p.iam.gserviceaccount.com "
    "does not have storage.buckets.get access to the Google Cloud Storage bucket. error_info={reason=forbidden, "
    "domain=global, metadata={gcloud-cpp.retry.function=GetBucketMetadata, http_status_code=403}})"
)


def transient(status: str, words: str, code: int) -> OSError:
    return OSError(
        f"google::cloud::Status({status}: Retry policy exhausted, with a last message of {words} error_info={{reason=, "
        f"domain=global, metadata={{gcloud-cpp.retry.reason=retry-policy-exhausted, http_status_code={code}}}}})"
    )


def test_gcs_errors_are_worded_and_classified_by_their_status(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    assert one_line(OSError(NO_BUCKET)).startswith("the bucket does not exist at Google Cloud Storage:")
    assert one_line(PermissionError(DENIED)).startswith(
        "object storage at Google Cloud Storage refused access to the bucket (PERMISSION_DENIED): check the "
        "credentials (Application Default Credentials"
    )
    assert storage.transient_cause(transient("UNAVAILABLE", "Rate limit exceeded", 429)) == "throttled"
    assert storage.transient_cause(transient("UNAVAILABLE", "Backend Error", 503)) == "throttled"
    assert storage.transient_cause(transient("UNAVAILABLE", "Internal Error", 500)) == "server error"
    assert storage.transient_cause(OSError(DENIED)) is None
    # A bucket whose metadata the credentials may not read (Storage Object Admin) passes the check: only use tells.
    monkeypatch.setattr(storage.RetryingStore, "native", lambda self, attempts: _Refusing())
    storage.check_location("gs://objects-only/x", "output")
    with pytest.raises(OSError, match="PERMISSION_DENIED"):
        storage.check_location("gs://objects-only/x", "dataset path", must_exist=True)


class _Refusing:
    def get_file_info(self, path):
        raise OSError(DENIED)


@pytest.mark.parametrize(
    "name,args",
    [
        ("prepare_imagenet.py", ("{data}", "gs://no-such-bucket/shards")),  # the output
        ("evaluate.py", ("--model", "gs://no-such-bucket/checkpoint")),
    ],
)
def test_the_jobs_answer_a_missing_bucket_in_one_line(gcs_server, tiny_imagenet, tmp_path, name, args):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / name), *(a.format(data=tiny_imagenet) for a in args)],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT), "STORAGE_EMULATOR_HOST": gcs_server},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith("error: ") and f"bucket 'no-such-bucket' does not exist at {gcs_server}" in lines[-1]


@contextmanager
def faulty_gcs(upstream: str, **rates):
    """tests/fault_proxy.py in front of the emulator, in a process of its own: pyarrow's GCS file holds the GIL
    while its first request waits, so a proxy thread in this process would never answer it. Yields (url, faults):
    faults, the proxy's Counter, filled in once the block ends."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import fault_proxy\n"
        "fault_proxy.SLOW_DOWN_BODY = sys.argv[4].encode()\n"
        "with fault_proxy.FaultProxy(sys.argv[2], **json.loads(sys.argv[3])) as proxy:\n"
        "    print(proxy.url, flush=True); sys.stdin.read(); print(json.dumps(dict(proxy.faults)), flush=True)\n"
    )
    args = [str(ROOT / "tests"), upstream, json.dumps(rates), json.dumps(GCS_503)]
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    faults: Counter = Counter()
    try:
        yield process.stdout.readline().strip(), faults
    finally:
        out, _ = process.communicate(timeout=30)
        faults.update(json.loads(out or "{}"))


@pytest.mark.parametrize("layout", ["folder", "shards"])
def test_reads_through_faults_give_the_same_rows_and_count_the_retries(uris, gcs_server, monkeypatch, layout):
    clean = read_everything(uris[layout])
    before = storage.retries()
    with faulty_gcs(gcs_server, seed=0, **RATES) as (url, faults):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        started = time.perf_counter()
        assert read_everything(uris[layout]) == clean
        assert read_everything(uris[layout]) == clean
        faulty_s = (time.perf_counter() - started) / 2
    retried = Counter(storage.retries()) - Counter(before)
    print(
        f"\n[gcs faults] {layout}: {faulty_s:.2f} s a pass through faults; proxy {dict(faults)}; "
        f"retried {dict(retried)}"
    )
    assert faults["slow_down"] > 0 and faults["reset"] + faults["truncate"] > 0
    assert retried["throttled"] > 0 and retried["connection"] > 0
    # google-cloud-cpp resumes a broken download itself a few times before it gives up: not every fault comes here.
    assert sum(retried.values()) <= faults["slow_down"] + faults["reset"] + faults["truncate"]


def test_a_store_that_never_recovers_gives_up_naming_the_object(uris, gcs_server, monkeypatch):
    monkeypatch.setattr(storage, "READ_ATTEMPTS", 3)
    source = sources.open_source(uris["shards"])
    with faulty_gcs(gcs_server, slow_down=1.0) as (url, _):  # every request answered 503
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        # The endpoint travels in the filesystem, as into a Ray task.
        faulty = dataclasses.replace(source, filesystem=storage.resolve(uris["shards"])[0])
        started = time.perf_counter()
        with pytest.raises(
            storage.StoreUnavailable, match=r"gs://tiny/shards/.* still failing after 3 attempts \(throttled"
        ):
            sources.read_unit(faulty, "train", 0, seed=0, epoch=0, shuffle=False)
        assert time.perf_counter() - started < 10


@pytest.mark.timeout(600)
def test_a_team_server_keeps_the_models_on_gcs(ray_session, gcs_server, tiny_imagenet, tmp_path, monkeypatch):
    """MLflow's artifacts on gs:// (`mlflow server --artifacts-destination gs://...`, which needs
    google-cloud-storage): a training run's logged and registered model lands in the bucket, through the
    server, and loads back from the registry."""
    from google.cloud import storage as gcs  # the emulator at STORAGE_EMULATOR_HOST (gcs_server), no credentials

    from conftest import TINY_RUN, start_mlflow_server, stop_mlflow_server
    from pipeline.config import PRESETS
    from pipeline.train import driver

    gcs.Client().create_bucket("team-mlflow")
    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow", port, artifacts="gs://team-mlflow/mlflow-artifacts")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.chdir(tmp_path)
        cfg = dataclasses.replace(
            PRESETS["sample"],
            **{**TINY_RUN, "epochs": 1, "workers": 1, "experiment": "gcs-artifacts", "registered_model": "gcs"},
            data=str(tiny_imagenet),
            storage_path=str(tmp_path / "ray_results"),
        )
        summary = driver.run(cfg)
        assert summary["registration"].uri.startswith("models:/gcs/")
        blobs = [b.name for b in gcs.Client().list_blobs("team-mlflow")]
        model = [name for name in blobs if name.startswith("mlflow-artifacts/1/models/")]
        assert any(name.endswith("/MLmodel") for name in model) and len(model) > 3, blobs  # its files, in the bucket
        import mlflow

        loaded = mlflow.pyfunc.load_model(summary["registration"].uri)  # downloaded from gs:// through the server
        assert any(f"/models/{loaded.metadata.model_id}/" in name for name in model)  # the one in the bucket
    finally:
        stop_mlflow_server(server)
