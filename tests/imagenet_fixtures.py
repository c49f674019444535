"""Tiny ImageNet fixtures in every layout pipeline.imagenet reads, and what each must yield.

Every image is one solid colour, its class's (class_colours), so a test can decode a record and
check that its label followed it. Sizes vary between 40x30 and 90x70. With bad=True the train split
also holds the odd files of the real set and worse:

    convertible  png (a PNG named .JPEG), cmyk, grayscale       clean_image turns them into RGB JPEGs
    bad          truncated, zero_byte, not_image (text bytes)   clean_image must raise BadImage

Val labels always include two images that are absent (a partial val must read fine), and the
devkit numbers the classes in an order that is not sorted-wnid order, as the real one does.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n02119789")  # tench, goldfish, kit fox
PALETTE = ((220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (200, 60, 200), (40, 200, 210))
CONVERTIBLE = ("png", "cmyk", "grayscale")
BAD = ("truncated", "zero_byte", "not_image")
LABEL_KINDS = ("loc", "ground_truth", "devkit_tarball")
META_FIELDS = (
    "ILSVRC2012_ID",
    "WNID",
    "words",
    "gloss",
    "num_children",
    "children",
    "wordnet_height",
    "num_train_images",
)


@dataclass
class Expected:
    labels: dict[str, str] = field(default_factory=dict)  # image_id -> wnid of every record
    coloured: set[str] = field(default_factory=set)  # image_ids that decode to their class colour
    convertible: dict[str, str] = field(default_factory=dict)  # image_id -> kind, see CONVERTIBLE
    bad: dict[str, str] = field(default_factory=dict)  # image_id -> kind, see BAD
    class_colours: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def __or__(self, other: Expected) -> Expected:
        assert not self.labels.keys() & other.labels.keys(), "fixtures overlap"
        return Expected(
            self.labels | other.labels,
            self.coloured | other.coloured,
            self.convertible | other.convertible,
            self.bad | other.bad,
            self.class_colours | other.class_colours,
        )


def devkit_ids(wnids) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid: sorted wnids rotated by one, so no class has ID == sorted index + 1."""
    ordered = sorted(wnids)
    return {i + 1: wnid for i, wnid in enumerate(ordered[-1:] + ordered[:-1])}


def write_extracted(
    root: Path, *, wnids=WNIDS, train_per_class=4, val_per_class=2, bad=True, seed=0, train=True, val=True
) -> Expected:
    """root/train/<wnid>/<wnid>_<n>.JPEG and root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG."""
    expected = Expected(class_colours=_class_colours(wnids))
    if train:
        for wnid, name, data in _train_files(wnids, train_per_class, bad, seed, expected):
            _write(root / "train" / wnid / name, data)
    if val:
        for wnid, name, data in _val_files(wnids, val_per_class, seed, expected):
            _write(root / "val" / wnid / name, data)
    return expected


def write_flat_val(
    root: Path, *, labels: str = "loc", wnids=WNIDS, per_class=2, seed=0, labels_at: Path | None = None
) -> Expected:
    """root/val/ILSVRC2012_val_<8 digits>.JPEG with no class folders, and the labels (see write_labels)
    in labels_at (default root)."""
    expected = Expected(class_colours=_class_colours(wnids))
    files = _val_files(wnids, per_class, seed, expected)
    for _, name, data in files:
        _write(root / "val" / name, data)
    write_labels(labels_at or root, labels, {name.removesuffix(".JPEG"): w for w, name, _ in files}, wnids)
    return expected


def write_archives(
    root: Path,
    *,
    labels: str = "loc",
    wnids=WNIDS,
    train_per_class=4,
    val_per_class=2,
    bad=True,
    seed=0,
    train=True,
    val=True,
) -> Expected:
    """The official downloads: root/ILSVRC2012_img_train.tar (a tar of <wnid>.tar) and
    root/ILSVRC2012_img_val.tar (flat), plus the val labels (see write_labels)."""
    expected = Expected(class_colours=_class_colours(wnids))
    root.mkdir(parents=True, exist_ok=True)
    if train:
        by_class: dict[str, list[tuple[str, bytes]]] = {w: [] for w in wnids}
        for wnid, name, data in _train_files(wnids, train_per_class, bad, seed, expected):
            by_class[wnid].append((name, data))
        _write(
            root / "ILSVRC2012_img_train.tar", _tar([(f"{wnid}.tar", _tar(files)) for wnid, files in by_class.items()])
        )
    if val:
        files = _val_files(wnids, val_per_class, seed, expected)
        _write(root / "ILSVRC2012_img_val.tar", _tar([(name, data) for _, name, data in files]))
        write_labels(root, labels, {name.removesuffix(".JPEG"): w for w, name, _ in files}, wnids)
    return expected


def write_labels(root: Path, kind: str, val_wnids: dict[str, str], wnids=WNIDS) -> None:
    """Val labels as users hold them, for val_wnids plus two absent images.

    loc             root/LOC_val_solution.csv (Kaggle; rows in no particular order)
    ground_truth    root/ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}
    devkit_tarball  the same two inside root/ILSVRC2012_devkit_t12.tar.gz, as downloaded
    """
    if kind not in LABEL_KINDS:
        raise ValueError(f"labels must be one of {LABEL_KINDS}, got {kind!r}")
    n = len(val_wnids)
    absent = {f"ILSVRC2012_val_{n + 1:08d}": wnids[0], f"ILSVRC2012_val_{n + 2:08d}": wnids[-1]}
    all_wnids = val_wnids | absent
    if kind == "loc":
        rows = [f"{stem},{w} 1 2 30 25 {w} 5 6 20 18" for stem, w in reversed(sorted(all_wnids.items()))]
        _write(root / "LOC_val_solution.csv", ("ImageId,PredictionString\n" + "\n".join(rows) + "\n").encode())
        return
    ids = devkit_ids(wnids)
    id_of = {w: i for i, w in ids.items()}
    # The ground truth's line i labels ILSVRC2012_val_{i:08d}, so the stems must run 1..n(+2).
    assert sorted(all_wnids) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, n + 3)]
    ground_truth = "".join(f"{id_of[all_wnids[stem]]}\n" for stem in sorted(all_wnids)).encode()
    meta = io.BytesIO()
    write_meta_mat(meta, ids)
    files = [
        ("ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue()),
        ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", ground_truth),
    ]
    if kind == "ground_truth":
        for name, data in files:
            _write(root / name, data)
    else:
        _write(root / "ILSVRC2012_devkit_t12.tar.gz", _tar(files, gzip=True))


def write_meta_mat(path, ids_to_wnids: dict[int, str], extra_non_leaf: int = 2) -> None:
    """The devkit's data/meta.mat structure: a (n, 1) struct array `synsets`, numbers as MATLAB
    doubles, the non-leaf synsets (IDs after the classes, num_children > 0) first, so neither
    position nor ID order gives the sorted-wnid order. `path` may be a file-like object."""
    leaf_ids = sorted(ids_to_wnids)
    rows = [
        (
            1000 + k + 1,
            f"n0000{k + 1:04d}",
            f"ancestor {k}",
            "a WordNet ancestor",
            len(leaf_ids),
            np.array([leaf_ids], dtype=float),
            2 + k,
            0,
        )
        for k in range(extra_non_leaf)
    ]
    rows += [
        (class_id, ids_to_wnids[class_id], f"class {class_id}", "a class", 0, np.zeros((1, 0)), 0, 1300)
        for class_id in leaf_ids
    ]
    synsets = np.empty((len(rows), 1), dtype=[(name, object) for name in META_FIELDS])
    for i, (class_id, wnid, words, gloss, num_children, children, height, num_train) in enumerate(rows):
        synsets[i, 0] = (
            float(class_id),
            wnid,
            words,
            gloss,
            float(num_children),
            children,
            float(height),
            float(num_train),
        )
    scipy.io.savemat(path, {"synsets": synsets})


def image_bytes(colour, size, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """One solid-colour image, (width, height), encoded as fmt after converting to mode."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(out, format=fmt, quality=95)
    return out.getvalue()


def odd_file(kind: str, colour, rng) -> bytes:
    """The bytes of one odd file, kind one of CONVERTIBLE + BAD."""
    if kind == "png":
        return image_bytes(colour, _size(rng), "RGB", "PNG")
    if kind == "cmyk":
        return image_bytes(colour, _size(rng), "CMYK", "JPEG")
    if kind == "grayscale":
        return image_bytes(colour, _size(rng), "L", "JPEG")
    if kind == "truncated":
        # Noise, so the entropy-coded data is long and the cut lands inside it.
        noise = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
        out = io.BytesIO()
        noise.save(out, format="JPEG", quality=90)
        return out.getvalue()[: len(out.getvalue()) * 6 // 10]
    if kind == "zero_byte":
        return b""
    if kind == "not_image":
        return b"This is not a JPEG: a README that ended up among the images.\n"
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------


def _class_colours(wnids) -> dict[str, tuple[int, int, int]]:
    if len(wnids) > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} classes, got {len(wnids)}")
    return dict(zip(wnids, PALETTE))


def _train_files(wnids, per_class, bad, seed, expected: Expected) -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of the train split; fills `expected`."""
    rng = np.random.default_rng([seed, 0])
    files = []
    for wnid in wnids:
        colour = expected.class_colours[wnid]
        for n in range(1, per_class + 1):
            name = f"{wnid}_{n}.JPEG"
            files.append((wnid, name, image_bytes(colour, _size(rng), "RGB", "JPEG")))
            expected.labels[f"train/{wnid}_{n}"] = wnid
            expected.coloured.add(f"train/{wnid}_{n}")
    if bad:
        for k, kind in enumerate(CONVERTIBLE + BAD):
            wnid = wnids[k % len(wnids)]
            name, colour = f"{wnid}_{9001 + k}.JPEG", expected.class_colours[wnid]
            image_id = f"train/{wnid}_{9001 + k}"
            files.append((wnid, name, odd_file(kind, colour, rng)))
            expected.labels[image_id] = wnid
            if kind in CONVERTIBLE:
                expected.convertible[image_id] = kind
                if kind != "grayscale":
                    expected.coloured.add(image_id)
            else:
                expected.bad[image_id] = kind
    return files


def _val_files(wnids, per_class, seed, expected: Expected) -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of the val split: ILSVRC2012_val_00000001.. with classes shuffled."""
    rng = np.random.default_rng([seed, 1])
    classes = rng.permutation(np.repeat(np.arange(len(wnids)), per_class))
    files = []
    for index, c in enumerate(classes, start=1):
        wnid, stem = wnids[c], f"ILSVRC2012_val_{index:08d}"
        files.append((wnid, f"{stem}.JPEG", image_bytes(expected.class_colours[wnid], _size(rng), "RGB", "JPEG")))
        expected.labels[f"val/{stem}"] = wnid
        expected.coloured.add(f"val/{stem}")
    return files


def _size(rng) -> tuple[int, int]:
    return int(rng.integers(40, 91)), int(rng.integers(30, 71))


def _tar(files: list[tuple[str, bytes]], gzip: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
