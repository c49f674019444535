"""The model people find in the registry: image bytes in, the five likeliest classes out.

    ImageClassifier          an mlflow.pyfunc.PythonModel: decode, shorter side to resize_size, central
                             crop, normalise (the functions validation uses), the network, softmax, top 5
    log_model(state, ...)    one epoch's logged model: model.pt (checkpoint.for_serving), the code it runs
                             (served_sources), the signature and the pip requirements

Input: a DataFrame with a column "image" of encoded image bytes (JPEG, PNG, ...). Through
`mlflow models serve` the column travels as base64 strings, which MLflow decodes because the signature
declares it binary. Output, one row per image, best first: indices, wnids, words, probabilities (top 5,
or every class when there are fewer), and error ("" or why that image could not be decoded; the other
rows are still answered).

The model carries the source it runs (code_paths: the `pipeline` modules served_model.py imports, found by
reading their imports, in their folders), so it loads with MLflow and the pip requirements alone, without a
checkout of this repository; it is built by running served_model.py ("models from code"), so it holds no
pickled object, and its weights load with torch.load(weights_only=True).
"""

from __future__ import annotations

import ast
import base64
import importlib.metadata
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc import PythonModel

TOP = 5
COLUMN = "image"
# Images decoded and run through the network at a time: bounds memory for a large request.
CHUNK = 64
# What the served model imports, pinned to the versions that trained it.
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pillow", "simplejpeg", "opencv-python-headless", "mlflow")


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, COLUMN)]),
        outputs=Schema(
            [
                ColSpec(Array(DataType.long), "indices"),
                ColSpec(Array(DataType.string), "wnids"),
                ColSpec(Array(DataType.string), "words"),
                ColSpec(Array(DataType.double), "probabilities"),
                ColSpec(DataType.string, "error"),
            ]
        ),
    )


def _as_bytes(value: Any) -> bytes:
    """Bytes as they are; a str is base64 (what a client sends when it calls predict with JSON-ready data)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value)
    raise TypeError(f"column {COLUMN!r} holds {type(value).__name__}; expected image bytes or a base64 string")


class ImageClassifier(PythonModel):
    """A checkpoint's network behind the evaluation view (stages.center_crops), top-5 out."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.models import checkpoint  # deferred: torch, when a model is loaded, not when imported

        state = checkpoint.load(context.artifacts["model"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network = checkpoint.build_model(state).to(self.device)  # a torch nn.Module, for those who want it
        cfg = state["config"]
        self.resize_size, self.crop_size = cfg["resize_size"], cfg["crop_size"]
        n = state["num_classes"]
        self.wnids = state["classes"] or [str(i) for i in range(n)]
        self.words = state["words"] or [""] * n

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if COLUMN not in getattr(model_input, "columns", ()):
            raise ValueError(
                f"expected a DataFrame with a column {COLUMN!r} of image bytes, got "
                f"{type(model_input).__name__} with columns {list(getattr(model_input, 'columns', []))}"
            )
        data = [_as_bytes(v) for v in model_input[COLUMN]]
        rows: list[dict[str, Any]] = []
        for start in range(0, len(data), CHUNK):
            rows += self._classify(data[start : start + CHUNK], first=start)
        return pd.DataFrame(rows, columns=["indices", "wnids", "words", "probabilities", "error"])

    def _classify(self, data: list[bytes], first: int) -> list[dict[str, Any]]:
        import torch

        from pipeline.transforms import device_stages, stages  # deferred: torch and the decoders, as above

        keys = [f"row {first + i}" for i in range(len(data))]
        out = stages.center_crops(
            {"jpeg": data, "key": keys}, resize_size=self.resize_size, crop_size=self.crop_size, errors="collect"
        )
        answers: dict[str, dict[str, Any]] = {}
        if len(out["image"]):
            with torch.inference_mode():
                x = device_stages.normalize(device_stages.to_float(torch.from_numpy(out["image"]).to(self.device)))
                probs = self.network(x).float().softmax(dim=1)
                top = probs.topk(min(TOP, probs.shape[1]), dim=1)
            for key, p, i in zip(out["key"], top.values.cpu().tolist(), top.indices.cpu().tolist()):
                answers[key] = {
                    "indices": i,
                    "wnids": [self.wnids[c] for c in i],
                    "words": [self.words[c] for c in i],
                    "probabilities": p,
                    "error": "",
                }
        for key, reason in out["failed"].items():
            answers[key] = {"indices": [], "wnids": [], "words": [], "probabilities": [], "error": reason}
        return [answers[key] for key in keys]


def requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


PACKAGE = Path(__file__).resolve().parents[1]  # pipeline/
SERVED = Path(__file__).with_name("served_model.py")  # what MLflow runs to build the model


def _module_file(name: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py; None when it is not a module of ours."""
    parts = name.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.joinpath(*parts[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """The names of the `pipeline` modules the file at `path` imports, anywhere in it (inside functions too:
    the classifier imports torch and its stages lazily), relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..a import b
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from pipeline.a import b` names the module pipeline.a.b when b is one, not an attribute.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if _module_file(m) is not None}


def served_sources(entry: Path = SERVED) -> list[Path]:
    """The files the served model runs: `entry`, the `pipeline` modules it imports, transitively, and the
    __init__.py of every package on their way (importing pipeline.a.b runs pipeline/__init__.py and
    pipeline/a/__init__.py first, so their imports count too). Sorted paths inside pipeline/."""
    files: set[Path] = set()
    todo = [entry.resolve()]
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        name = _module_name(path)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += [f for m in sorted(_imported(path)) + parents if (f := _module_file(m)) is not None]
    return sorted(files)


def _package_source(into: Path) -> Path:
    """Copies of served_sources() under into/pipeline, folders kept, for code_paths: only what the model
    imports, so a logged model neither misses a subpackage nor ships the training and experiment code."""
    for path in served_sources():
        target = into / path.relative_to(PACKAGE.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return into / PACKAGE.name


def log_model(state: dict[str, Any], *, name: str, run_id: str, step: int, tags: dict[str, str]) -> str:
    """Log `state` (a checkpoint's) as a logged model of run `run_id`, in the run's experiment; returns its id.

    The model is created first, then filled, then named as the run's output for `step`; nothing here
    starts or ends the run (the callback runs beside a live run: leaving a `with mlflow.start_run(run_id)`
    block would mark it FINISHED while training goes on), and only the metrics logged with this model's
    id land on it (log_model given a run copies every metric of that step, system metrics included).
    """
    import torch
    from mlflow.entities import LoggedModelOutput

    from pipeline.models import checkpoint  # deferred: torch, for the callback that logs, not every importer

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=tags, params=run.data.params, experiment_id=run.info.experiment_id
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / checkpoint.MODEL_FILE
        torch.save(checkpoint.for_serving(state), weights)
        with warnings.catch_warnings():  # the signature is stated; an input example would add nothing to it
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            mlflow.pyfunc.log_model(
                name=name,
                model_id=model.model_id,
                # Models from code: the logged model runs served_model.py; no pickled object in it.
                python_model=str(SERVED),
                artifacts={"model": str(weights)},
                code_paths=[str(_package_source(Path(tmp) / "code"))],
                signature=signature(),
                # Stated, not inferred: inferring them loads the model in a subprocess.
                pip_requirements=requirements(),
            )
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return model.model_id


def example_frame(images: list[bytes]) -> pd.DataFrame:
    """The input for predict: one row per encoded image."""
    return pd.DataFrame({COLUMN: pd.Series(images, dtype=object)})


def serving_request(images: list[bytes]) -> dict[str, Any]:
    """The JSON body `mlflow models serve` takes for these images (POST /invocations)."""
    return {
        "dataframe_split": {
            "columns": [COLUMN],
            "data": [[base64.b64encode(image).decode("ascii")] for image in images],
        }
    }
