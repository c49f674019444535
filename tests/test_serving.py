"""The registered model classifies image files: through a real `mlflow models serve` process (HTTP, base64
JPEGs in a DataFrame column) and through mlflow.pyfunc.load_model, with the same answers as the network
itself on the evaluation view. A logged model carries exactly the modules it imports and loads with nothing
of this checkout; a checkpoint and a logged model of the flat layout (f34a58d) still serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import free_port, wait_for_http
from pipeline.models import checkpoint
from pipeline.tracking import classifier
from pipeline.transforms import device_stages, stages

ROOT = Path(__file__).resolve().parents[1]
# Written by the code of f34a58d, before pipeline/ moved into subpackages (fixtures/make_old_fixtures.py).
OLD = Path(__file__).parent / "fixtures" / "old_layout"
# What served_model.py imports, transitively, with the __init__.py of each package on the way: no training,
# data-plan or experiment code.
PACKAGED = {
    "pipeline/__init__.py",
    "pipeline/models/__init__.py",
    "pipeline/models/alexnet.py",
    "pipeline/models/checkpoint.py",
    "pipeline/models/placement.py",
    "pipeline/tracking/__init__.py",
    "pipeline/tracking/classifier.py",
    "pipeline/tracking/served_model.py",
    "pipeline/transforms/__init__.py",
    "pipeline/transforms/constants.py",
    "pipeline/transforms/decode.py",
    "pipeline/transforms/device_stages.py",
    "pipeline/transforms/stages.py",
}

# Run in a fresh interpreter: load the MLflow model folder argv[1] and classify the image files argv[2:], with
# nothing of this checkout importable. The venv holds the project as an editable install (pip install -e .):
# its finder on sys.meta_path, and any sys.path entry inside the checkout but outside the venv, go first.
ISOLATED = """
import json, os, sys
root = os.path.realpath(os.environ["CHECKOUT"])
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", type(f).__module__)]
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
def inside(path, folder):
    return (os.path.realpath(path or ".") + os.sep).startswith(os.path.realpath(folder) + os.sep)
sys.path = [p for p in sys.path if not inside(p, root) or inside(p, sys.prefix)]  # the venv may be in the checkout
sys.path_importer_cache.clear()
import importlib.util
assert importlib.util.find_spec("pipeline") is None, "pipeline is importable before the model is loaded"

import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = [open(p, "rb").read() for p in sys.argv[2:]]
rows = model.predict(pd.DataFrame({"image": pd.Series(images, dtype=object)}))
import pipeline
print("RESULT " + json.dumps({
    "pipeline": pipeline.__file__,
    "modules": sorted(m.__file__ for n, m in sys.modules.items() if n.split(".")[0] == "pipeline"),
    "rows": [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in rows.to_dict("records")],
}))
"""


def run_isolated(model_folder: Path, images: list[Path], cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    out = subprocess.run(
        [sys.executable, "-c", ISOLATED, str(model_folder), *map(str, images)],
        cwd=cwd,
        env={**env, "CHECKOUT": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def packaged(model_folder: Path) -> set[str]:
    code = model_folder / "code"
    return {p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def champion(trained_run, mlflow_server):
    cfg, _ = trained_run
    return f"models:/{cfg.registered_model}@champion"


@pytest.fixture(scope="module")
def served(champion, mlflow_server, tmp_path_factory):
    """`mlflow models serve` of the champion, from a folder outside this repository, in this environment."""
    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    log = open(folder / "serve.log", "w")
    # `mlflow models serve` starts `uvicorn` by name: this environment's bin/ goes first on the PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PATH": path}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            champion,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", process, timeout=180)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def files(tiny_imagenet) -> list[tuple[bytes, int]]:
    """Real JPEG files of the val split with their labels, one per class, and a grayscale one."""
    wnids = sorted(p.name for p in (tiny_imagenet / "val").iterdir())
    chosen = [sorted((tiny_imagenet / "val" / w).glob("*.JPEG"))[0] for w in wnids]
    return [(p.read_bytes(), wnids.index(p.parent.name)) for p in chosen]


def expected(champion: str, jpegs: list[bytes]) -> tuple[np.ndarray, list[str]]:
    """The checkpoint's network on the evaluation view, computed here: (probabilities, wnids)."""
    state = checkpoint.open_model(champion).state
    crops = stages.center_crops(
        {"jpeg": jpegs, "key": [str(i) for i in range(len(jpegs))]},
        resize_size=state["config"]["resize_size"],
        crop_size=state["config"]["crop_size"],
    )
    with torch.no_grad():
        x = device_stages.normalize(device_stages.to_float(torch.from_numpy(crops["image"])))
        return checkpoint.build_model(state)(x).softmax(1).numpy(), state["classes"]


def check_answers(rows: list[dict], probs: np.ndarray, wnids: list[str]) -> None:
    for row, p in zip(rows, probs):
        order = np.argsort(-p, kind="stable")[:5]
        assert row["error"] == ""
        assert row["indices"] == order.tolist()
        assert row["wnids"] == [wnids[i] for i in order]
        assert row["probabilities"] == pytest.approx(p[order].tolist(), abs=1e-5)


def test_served_model_answers_http_requests_carrying_jpeg_files(served, champion, files, mlflow_server):
    jpegs = [data for data, _ in files]
    body = json.dumps(classifier.serving_request(jpegs + [b"this is not an image"])).encode()
    request = urllib.request.Request(f"{served}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        rows = json.loads(response.read())["predictions"]
    assert len(rows) == len(jpegs) + 1
    mlflow.set_tracking_uri(mlflow_server)
    probs, wnids = expected(champion, jpegs)
    check_answers(rows[:-1], probs, wnids)
    assert len(rows[0]["indices"]) == 3  # 3 classes: the top 5 is all of them
    # A file that is not an image gets its reason; the others are still answered.
    assert rows[-1]["indices"] == [] and "not an image" in rows[-1]["error"]


def test_loaded_model_predicts_from_bytes_or_base64(champion, files, mlflow_server):
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(champion)
    jpegs = [data for data, _ in files]
    rows = model.predict(classifier.example_frame(jpegs)).to_dict("records")
    rows = [{k: (list(v) if isinstance(v, (list, np.ndarray)) else v) for k, v in r.items()} for r in rows]
    probs, wnids = expected(champion, jpegs)
    check_answers(rows, probs, wnids)
    # A base64 string, as a JSON client would send it, works too.
    b64 = classifier.serving_request(jpegs[:1])["dataframe_split"]["data"][0][0]
    as_text = model.predict(pd.DataFrame({"image": [b64]}))
    assert list(as_text.iloc[0]["indices"]) == rows[0]["indices"]
    # The network is there for those who want the torch module.
    assert isinstance(model.unwrap_python_model().network, torch.nn.Module)


def test_the_logged_code_is_what_the_served_model_imports():
    found = {p.relative_to(ROOT).as_posix() for p in classifier.served_sources()}
    assert found == PACKAGED


def test_the_model_does_not_need_this_repository(champion, files, mlflow_server, tmp_path):
    """Loaded in a fresh interpreter that cannot import this checkout, `pipeline` comes from the model's own
    code folder, which holds exactly PACKAGED, and the answers are the network's."""
    mlflow.set_tracking_uri(mlflow_server)
    folder = Path(mlflow.artifacts.download_artifacts(champion, dst_path=str(tmp_path / "model")))
    assert packaged(folder) == PACKAGED
    assert not (folder / "code" / "pipeline" / "experiments").exists()  # no ablate.py, benchmark.py, ...
    images = []
    for i, (data, _) in enumerate(files):
        images.append(tmp_path / f"{i}.JPEG")
        images[-1].write_bytes(data)
    (tmp_path / "cwd").mkdir()

    result = run_isolated(folder, images, cwd=tmp_path / "cwd")
    code = (folder / "code").resolve()
    assert Path(result["pipeline"]).resolve() == code / "pipeline" / "__init__.py"
    assert all(code in Path(m).resolve().parents for m in result["modules"])
    probs, wnids = expected(champion, [data for data, _ in files])
    check_answers(result["rows"], probs, wnids)


def old_images() -> list[Path]:
    return sorted((OLD / "val").glob("*.JPEG"))


def check_old_answers(rows: list[dict]) -> None:
    """The answers of the flat layout's network, from its own logits on these files."""
    logits = torch.load(OLD / "expected.pt", weights_only=True)["logits"]
    wnids = [p.stem for p in old_images()]
    check_answers(rows, logits.softmax(1).numpy(), wnids)
    assert [row["indices"][0] for row in rows] == [0, 1, 2]


def test_a_checkpoint_of_the_flat_layout_is_logged_and_served(mlflow_server):
    """The old checkpoint.pt through today's classifier.log_model, loaded back by MLflow: the old network's
    answers on the image files."""
    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()  # not set_experiment: it would stay this test process's active experiment
    found = client.get_experiment_by_name("old-checkpoint")
    run = client.create_run(found.experiment_id if found else client.create_experiment("old-checkpoint"))
    model_id = classifier.log_model(
        checkpoint.load(OLD), name="model", run_id=run.info.run_id, step=0, tags={"epoch": "0"}
    )
    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    rows = model.predict(classifier.example_frame([p.read_bytes() for p in old_images()])).to_dict("records")
    check_old_answers([{k: (list(v) if isinstance(v, (list, np.ndarray)) else v) for k, v in r.items()} for r in rows])


@pytest.mark.slow  # a job in a subprocess
def test_a_model_the_flat_layout_logged_still_loads_on_its_own(tmp_path):
    """A logged model of f34a58d runs its own copy of the flat pipeline/ (classifier_model.py imports
    pipeline.classifier, which no longer exists here), in a fresh interpreter without this checkout."""
    folder = tmp_path / "model"
    shutil.copytree(OLD / "logged_model", folder)  # loading writes __pycache__ next to the code
    assert "pipeline/classifier.py" in packaged(folder) and "pipeline/tracking/__init__.py" not in packaged(folder)
    (tmp_path / "cwd").mkdir()
    result = run_isolated(folder, old_images(), cwd=tmp_path / "cwd")
    assert Path(result["pipeline"]).resolve() == (folder / "code" / "pipeline" / "__init__.py").resolve()
    assert str((folder / "code" / "pipeline" / "classifier.py").resolve()) in map(
        lambda m: str(Path(m).resolve()), result["modules"]
    )
    check_old_answers(result["rows"])
