"""The ILSVRC-2012 label metadata: which class each val image belongs to, from the files that say so.

    read_loc_val_solution(text)        Kaggle's LOC_val_solution.csv -> {val stem: wnid}
    read_devkit_meta(bytes)            the devkit's data/meta.mat -> {ILSVRC2012_ID: wnid}
    read_val_ground_truth(text)        data/ILSVRC2012_validation_ground_truth.txt -> ILSVRC2012_IDs
    val_wnids_from_ground_truth(...)   the two together -> {val stem: wnid}
    find_val_labels(root_uri, ...)     {val stem: wnid} for a root: explicit URIs first, then what the
                                       root holds (imagenet.val_labels_finder calls it when a flat val
                                       layout needs labels)

The devkit is the ILSVRC2012_devkit_t12 folder, the ILSVRC2012_devkit_t12.tar.gz as downloaded, or
its bare meta.mat. Only the flat val layouts (root/val/ILSVRC2012_val_*.JPEG, the val tar) need any
of this: class folders and the train archive's <wnid>.tar name their class themselves.
"""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pyarrow.fs as pafs

from pipeline.data.storage import join, resolve

LOC_VAL_SOLUTION = "LOC_val_solution.csv"
LOC_SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
DEVKIT_TARBALL = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "data/meta.mat"
DEVKIT_GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"

WNID = re.compile(r"n\d{8}")  # a WordNet id, ImageNet's name of a class


def read_loc_val_solution(text: str) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv -> {"ILSVRC2012_val_00008726": "n02119789", ...}.

    Rows are "ImageId,PredictionString" where the prediction string repeats "wnid x0 y0 x1 y1" per
    box; every box of a val image has the image's class, so the first token is the label.
    """
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "ImageId,PredictionString":
        head = lines[0][:80] if lines else ""
        raise ValueError(f"LOC_val_solution.csv: expected the header 'ImageId,PredictionString', got {head!r}")
    labels = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image_id, _, prediction = line.partition(",")
        tokens = prediction.split()
        if not tokens or not WNID.fullmatch(tokens[0]):
            raise ValueError(f"LOC_val_solution.csv line {number}: expected 'ImageId,<wnid> x y x y ...', got {line!r}")
        labels[image_id.strip()] = tokens[0]
    return labels


def read_devkit_meta(data: bytes) -> dict[int, str]:
    """The devkit's data/meta.mat -> {ILSVRC2012_ID: wnid} for the 1000 classes (IDs 1..1000).

    `synsets` also holds the WordNet ancestors of the classes (num_children > 0); only the leaves
    are classes. The IDs number the classes in the devkit's own order (ID 1 is n02119789, kit fox),
    which is not the sorted-wnid order that class indices use: map through wnids, never by position.
    """
    import scipy.io  # only the devkit path needs SciPy

    try:
        mat = scipy.io.loadmat(io.BytesIO(data))
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for non-MAT bytes
        raise ValueError(f"meta.mat: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    if "synsets" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"meta.mat: expected a variable 'synsets', found {found}")
    synsets = mat["synsets"]
    missing = {"ILSVRC2012_ID", "WNID", "num_children"} - set(synsets.dtype.names or ())
    if missing:
        raise ValueError(f"meta.mat: synsets lacks the fields {sorted(missing)}")

    classes: dict[int, str] = {}
    for synset in synsets.ravel():
        if _mat_scalar(synset["num_children"]) != 0:
            continue
        class_id, wnid = int(_mat_scalar(synset["ILSVRC2012_ID"])), str(_mat_scalar(synset["WNID"]))
        if class_id in classes:
            raise ValueError(f"meta.mat: ILSVRC2012_ID {class_id} is both {classes[class_id]} and {wnid}")
        classes[class_id] = wnid
    if not classes:
        raise ValueError("meta.mat: no leaf synsets (num_children == 0), so no classes")
    return dict(sorted(classes.items()))


def read_devkit_words(data: bytes) -> dict[str, str]:
    """meta.mat -> {wnid: words} of the classes ("tench, Tinca tinca"); read_devkit_meta checks the file."""
    import scipy.io  # only the devkit path needs SciPy

    read_devkit_meta(data)  # a file that is not a devkit's says so there
    synsets = scipy.io.loadmat(io.BytesIO(data))["synsets"]
    if "words" not in (synsets.dtype.names or ()):
        return {}
    return {
        str(_mat_scalar(synset["WNID"])): str(_mat_scalar(synset["words"]))
        for synset in synsets.ravel()
        if _mat_scalar(synset["num_children"]) == 0
    }


def read_synset_mapping(text: str) -> dict[str, str]:
    """Kaggle's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line) -> {wnid: words}."""
    words = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if WNID.fullmatch(wnid):
            words[wnid] = name.strip()
    return words


def find_class_words(root_uri: str, devkit: str | None = None) -> tuple[dict[str, str], str]:
    """{wnid: words} and where they came from: the devkit's meta.mat (given, or in root), else Kaggle's
    LOC_synset_mapping.txt in root; ({}, "") when root has neither (words are a courtesy, not a need)."""
    if devkit is None and _exists(mapping := join(root_uri, LOC_SYNSET_MAPPING)):
        return read_synset_mapping(_read(mapping).decode("utf-8-sig")), mapping
    in_root = [join(root_uri, DEVKIT_DIR), join(root_uri, DEVKIT_TARBALL)]
    kit = devkit if devkit is not None else next((k for k in in_root if _exists(k)), None)
    if kit is None:
        return {}, ""
    meta, where = _read_devkit(kit)["meta"]
    try:
        return read_devkit_words(meta), where
    except ImportError:  # SciPy reads meta.mat; without it the classes keep their wnids alone
        return {}, ""


def _mat_scalar(value):
    """loadmat wraps each struct field in arrays ([[1.]], ['n02119789'], [[array(...)]]): unwrap."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"meta.mat: expected one value in a synsets field, got shape {value.shape}")
        value = value.flat[0]
    return value


def read_val_ground_truth(text: str) -> list[int]:
    """ILSVRC2012_validation_ground_truth.txt -> ILSVRC2012_IDs; item i-1 labels ILSVRC2012_val_{i:08d}."""
    lines = text.rstrip().splitlines()
    if not lines:
        raise ValueError("validation ground truth: the file is empty")
    ids = []
    for number, line in enumerate(lines, start=1):
        try:
            ids.append(int(line))
        except ValueError:  # a blank line in the middle would shift every label after it
            raise ValueError(
                f"validation ground truth line {number}: expected an ILSVRC2012_ID, got {line!r}"
            ) from None
    return ids


def val_wnids_from_ground_truth(ground_truth: str, meta: bytes) -> dict[str, str]:
    """The devkit's val labels as {"ILSVRC2012_val_00000001": wnid, ...} (ground truth via meta.mat)."""
    id_to_wnid = read_devkit_meta(meta)
    labels = {}
    for index, class_id in enumerate(read_val_ground_truth(ground_truth), start=1):
        if class_id not in id_to_wnid:
            raise ValueError(
                f"validation ground truth line {index} (ILSVRC2012_val_{index:08d}) has ILSVRC2012_ID {class_id}, "
                f"which meta.mat has no class for (its classes are IDs {min(id_to_wnid)}..{max(id_to_wnid)})"
            )
        labels[f"ILSVRC2012_val_{index:08d}"] = id_to_wnid[class_id]
    return labels


# ---------------------------------------------------------------------------------------------
# Finding the val labels of a root


def find_val_labels(
    root_uri: str, val_labels: str | None = None, devkit: str | None = None
) -> tuple[dict[str, str], str]:
    """{val stem: wnid} and where it came from (for messages): explicit URIs first, then root."""
    ground_truth = None  # (text, uri)
    if val_labels is not None:
        text = _read(val_labels).decode("utf-8-sig")
        if text.startswith("ImageId,"):
            return read_loc_val_solution(text), val_labels
        ground_truth = (text, val_labels)
    elif devkit is None and _exists(loc := join(root_uri, LOC_VAL_SOLUTION)):
        return read_loc_val_solution(_read(loc).decode("utf-8-sig")), loc

    in_root = [join(root_uri, DEVKIT_DIR), join(root_uri, DEVKIT_TARBALL)]
    kit = devkit if devkit is not None else next((k for k in in_root if _exists(k)), None)
    if kit is None:
        if ground_truth:
            raise ValueError(
                f"{val_labels} numbers classes by ILSVRC2012_ID; mapping them to wnids needs the "
                f"devkit's {DEVKIT_META}: pass devkit= (the {DEVKIT_DIR} folder, its .tar.gz or "
                f"meta.mat)"
            )
        raise ValueError(
            f"val images under {root_uri} have no labels: looked for "
            f"{join(root_uri, LOC_VAL_SOLUTION)}, {join(in_root[0], DEVKIT_GROUND_TRUTH)}, "
            f"{in_root[1]}. Pass val_labels= ({LOC_VAL_SOLUTION} or "
            f"ILSVRC2012_validation_ground_truth.txt) and/or devkit="
        )
    found = _read_devkit(kit)
    ground_truth = ground_truth or found.get("ground_truth")
    if ground_truth is None:
        raise ValueError(
            f"devkit {kit} has no {DEVKIT_GROUND_TRUTH}: pass val_labels= "
            f"(ILSVRC2012_validation_ground_truth.txt or {LOC_VAL_SOLUTION})"
        )
    (text, text_uri), (meta, meta_uri) = ground_truth, found["meta"]
    return val_wnids_from_ground_truth(text, meta), f"{text_uri} (classes from {meta_uri})"


def _read_devkit(uri: str) -> dict[str, tuple]:
    """{"meta": (bytes, uri), "ground_truth": (text, uri)} from a devkit folder, its .tar.gz, or a
    bare meta.mat (which has no ground truth)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"devkit {uri!r} does not exist")
    found: dict[str, tuple] = {}
    if info.type == pafs.FileType.Directory:
        for name, rel in (("meta", DEVKIT_META), ("ground_truth", DEVKIT_GROUND_TRUTH)):
            if _exists(join(uri, rel)):
                found[name] = (_read(join(uri, rel)), join(uri, rel))
    elif path.endswith((".tar.gz", ".tgz", ".tar")):
        # About 2.5 MB as downloaded: read into memory, never onto disk.
        with tarfile.open(fileobj=io.BytesIO(_read(uri))) as tar:
            for info in tar.getmembers():
                for name, rel in (("meta", DEVKIT_META), ("ground_truth", DEVKIT_GROUND_TRUTH)):
                    if info.isfile() and info.name.endswith(rel):
                        member = tar.extractfile(info)
                        assert member is not None  # None only for what is not a file
                        found[name] = (member.read(), f"{uri}:{info.name}")
    else:
        found["meta"] = (_read(uri), uri)
    if "meta" not in found:
        raise FileNotFoundError(f"devkit {uri!r} has no {DEVKIT_META}")
    if "ground_truth" in found:
        data, where = found["ground_truth"]
        found["ground_truth"] = (data.decode("utf-8-sig"), where)
    return found


def _exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _read(uri: str) -> bytes:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri!r} is not a file")
    with fs.open_input_stream(path) as f:
        return f.read()
