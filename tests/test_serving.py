"""The registered model classifies image files: through a real `mlflow models serve` process (HTTP, base64
JPEGs in a DataFrame column) and through mlflow.pyfunc.load_model, with the same answers as the network
itself on the evaluation view."""

from __future__ import annotations

import json
import os
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
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
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
    crops = stages.center_crops({"jpeg": jpegs, "key": [str(i) for i in range(len(jpegs))]},
                                resize_size=state["config"]["resize_size"], crop_size=state["config"]["crop_size"])
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
    request = urllib.request.Request(f"{served}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
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


def test_the_model_does_not_need_this_repository(champion, mlflow_server, tmp_path):
    """Loaded in a fresh interpreter outside the checkout, `pipeline` comes from the model's own code."""
    script = f"import mlflow; mlflow.pyfunc.load_model({champion!r}); import pipeline; print(pipeline.__file__)"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(__file__).resolve().parents[1] not in Path(out.stdout.strip().splitlines()[-1]).resolve().parents
