"""pipeline.imagenet against real files: label metadata (and its traps), clean_image for every kind of
file ImageNet holds, and each input layout read back unit by unit to exactly the expected records."""

import io
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from imagenet_fixtures import (
    LABEL_KINDS,
    WNIDS,
    Expected,
    devkit_ids,
    image_bytes,
    odd_file,
    write_archives,
    write_extracted,
    write_flat_val,
    write_labels,
    write_meta_mat,
)
from PIL import Image, ImageFile

from pipeline.data import clean, devkit, imagenet
from pipeline.data.clean import BadImage, clean_image
from pipeline.data.imagenet import discover_inputs, iter_records
from pipeline.data.sample import photo_like
from pipeline.transforms import decode

# ---------------------------------------------------------------------------------------------
# Metadata


def meta_bytes(ids_to_wnids: dict[int, str], extra_non_leaf: int = 2) -> bytes:
    out = io.BytesIO()
    write_meta_mat(out, ids_to_wnids, extra_non_leaf)
    return out.getvalue()


def test_loc_val_solution_label_is_the_first_wnid():
    text = (
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n"
        "ILSVRC2012_val_00000001,n01751748 111 108 441 193 \n\n"
    )
    assert devkit.read_loc_val_solution(text) == {
        "ILSVRC2012_val_00008726": "n02119789",
        "ILSVRC2012_val_00000001": "n01751748",
    }


@pytest.mark.parametrize(
    "text,match",
    [
        ("ILSVRC2012_val_00000001,n01751748 1 2 3 4\n", "header"),  # no header
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,\n", "line 2"),  # no boxes
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,123 1 2 3 4\n", "line 2"),  # not a wnid
    ],
)
def test_loc_val_solution_rejects_what_it_is_not(text, match):
    with pytest.raises(ValueError, match=match):
        devkit.read_loc_val_solution(text)


def test_devkit_meta_maps_ids_through_wnids_not_sorted_order():
    ids = devkit_ids(WNIDS)
    assert ids[1] == "n02119789"  # as in the real devkit: ID 1 is kit fox, last in sorted order
    got = devkit.read_devkit_meta(meta_bytes(ids, extra_non_leaf=2))
    assert got == ids  # the two ancestors (num_children > 0, IDs 1001, 1002) are not classes
    # The trap: numbering the sorted wnids 1..n gives a different, wrong, map for every class.
    by_sorted_position = {i + 1: w for i, w in enumerate(sorted(WNIDS))}
    assert all(got[i] != by_sorted_position[i] for i in got)


def test_devkit_meta_reads_the_nesting_savemat_writes_for_matlab():
    # The real file is MATLAB-written: each field wrapped as [[1.]] / ['n02119789'], ids possibly uint16.
    synsets = np.empty((2, 1), dtype=[(f, object) for f in ("ILSVRC2012_ID", "WNID", "num_children", "children")])
    synsets[0, 0] = (
        np.array([[7]], dtype=np.uint16),
        np.array(["n01443537"]),
        np.array([[0]], np.uint8),
        np.zeros((1, 0)),
    )
    synsets[1, 0] = (
        np.array([[1001]], dtype=np.uint16),
        np.array(["n00001740"]),
        np.array([[1]], np.uint8),
        np.array([[7]], dtype=np.uint16),
    )
    out = io.BytesIO()
    scipy.io.savemat(out, {"synsets": synsets})
    assert devkit.read_devkit_meta(out.getvalue()) == {7: "n01443537"}


def test_devkit_meta_errors_say_what_was_wrong():
    with pytest.raises(ValueError, match="MATLAB"):
        devkit.read_devkit_meta(b"ImageId,PredictionString\n")
    other = io.BytesIO()
    scipy.io.savemat(other, {"classes": np.arange(3)})
    with pytest.raises(ValueError, match="synsets.*found \\['classes'\\]"):
        devkit.read_devkit_meta(other.getvalue())


def test_val_ground_truth_is_one_id_per_line_in_val_index_order():
    assert devkit.read_val_ground_truth("490\n361\n171\n") == [490, 361, 171]
    with pytest.raises(ValueError, match="line 2"):  # a blank line would shift every later label
        devkit.read_val_ground_truth("490\n\n171\n")
    with pytest.raises(ValueError, match="empty"):
        devkit.read_val_ground_truth("\n")


def test_val_wnids_from_ground_truth_go_through_the_devkit_ids():
    got = devkit.val_wnids_from_ground_truth("2\n1\n3\n1\n", meta_bytes(devkit_ids(WNIDS)))
    assert got == {
        "ILSVRC2012_val_00000001": "n01440764",
        "ILSVRC2012_val_00000002": "n02119789",
        "ILSVRC2012_val_00000003": "n01443537",
        "ILSVRC2012_val_00000004": "n02119789",
    }


def test_val_ground_truth_id_missing_from_meta_names_the_image():
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000002.*ILSVRC2012_ID 1001"):  # 1001: an ancestor
        devkit.val_wnids_from_ground_truth("1\n1001\n", meta_bytes(devkit_ids(WNIDS)))


def test_known_odd_files_are_train_file_names():
    names = clean.KNOWN_CMYK + clean.KNOWN_PNG
    assert len(clean.KNOWN_CMYK) == 22 and len(set(names)) == 23
    assert all(re.fullmatch(r"n\d{8}_\d+\.JPEG", name) for name in names)


# ---------------------------------------------------------------------------------------------
# One image

RED = (220, 40, 40)


def mean_colour(jpeg: bytes) -> np.ndarray:
    return decode.decode_image(jpeg).reshape(-1, 3).mean(axis=0)


def test_clean_rgb_jpeg_comes_back_byte_for_byte():
    data = image_bytes(RED, (64, 48))
    clean = clean_image(data, key="n01440764_1.JPEG")
    assert clean.jpeg == data and (clean.width, clean.height, clean.note) == (64, 48, "")
    # A resize that has nothing to do (already short enough) keeps the bytes too: no second lossy pass.
    assert clean_image(data, key="k", resize_shorter=256).jpeg == data


def rgba_half_transparent() -> bytes:
    img = Image.new("RGBA", (60, 40), RED + (255,))
    img.paste((0, 0, 0, 0), (0, 0, 30, 40))  # left half: transparent black
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "data,note",
    [
        (image_bytes(RED, (60, 40), "RGB", "PNG"), "converted from PNG"),
        (image_bytes(RED, (60, 40), "CMYK", "JPEG"), "converted from CMYK"),
        (image_bytes(RED, (60, 40), "L", "JPEG"), "converted from grayscale (L)"),
        (image_bytes(RED, (60, 40), "P", "PNG"), "converted from PNG, palette (P)"),
        (image_bytes(RED, (60, 40), "RGB", "GIF"), "converted from GIF, palette (P)"),
        (rgba_half_transparent(), "converted from PNG, RGBA"),
    ],
    ids=["png", "cmyk", "grayscale", "palette", "gif", "rgba"],
)
def test_clean_converts_odd_files_to_rgb_jpeg(data, note):
    clean = clean_image(data, key="odd.JPEG")
    assert clean.note == note and (clean.width, clean.height) == (60, 40)
    out = Image.open(io.BytesIO(clean.jpeg))
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (60, 40))
    pixels = decode.decode_image(clean.jpeg).astype(int)
    if "palette" not in note:  # (PIL dithers a palette image: pixel noise that JPEG does not keep)
        # The pixels training decodes from the original, up to one JPEG re-encode at quality 90.
        assert np.abs(pixels - decode.decode_image(data).astype(int)).mean() < 2
    if note.endswith("RGBA"):  # transparent shows as white, opaque keeps its colour
        assert np.abs(pixels[:, :25] - 255).max() < 10 and np.abs(pixels[:, 35:] - RED).max() < 10
    elif "grayscale" in note:
        assert np.ptp(pixels, axis=-1).max() <= 2 and abs(pixels.mean() - 0.299 * 220 - 0.587 * 40 - 0.114 * 40) < 4
    else:
        assert np.abs(pixels.reshape(-1, 3).mean(0) - RED).max() < 8


@pytest.mark.parametrize("size,resized", [((600, 400), (384, 256)), ((300, 500), (256, 427)), ((256, 300), (256, 300))])
def test_clean_resize_sets_the_shorter_side_keeps_aspect(size, resized):
    clean = clean_image(image_bytes(RED, size), key="k", resize_shorter=256)
    assert Image.open(io.BytesIO(clean.jpeg)).size == resized
    assert (clean.width, clean.height) == size  # the original's


def test_clean_resize_from_a_reduced_decode_keeps_the_detail():
    # 1024x768 -> shorter side 256: libjpeg decodes at 1/2 (512x384), then area averaging to 341x256.
    data = io.BytesIO()
    Image.fromarray(photo_like(np.random.default_rng(0), 1024, 768)).save(data, format="JPEG", quality=95)
    clean = clean_image(data.getvalue(), key="k", resize_shorter=256)
    got = decode.decode_image(clean.jpeg).astype(float)
    # The reference: a full-size decode and PIL's Lanczos, the slow way.
    reference = np.asarray(Image.open(data).convert("RGB").resize((341, 256), Image.LANCZOS), dtype=float)
    assert got.shape == reference.shape == (256, 341, 3)
    psnr = 10 * np.log10(255**2 / np.mean((got - reference) ** 2))
    assert psnr > 30, f"{psnr:.1f} dB"


def test_clean_resize_never_upscales_even_when_converting():
    clean = clean_image(image_bytes(RED, (200, 100), "CMYK"), key="k", resize_shorter=256)
    assert Image.open(io.BytesIO(clean.jpeg)).size == (200, 100) and clean.note == "converted from CMYK"


def test_clean_quality_is_the_reencode_quality():
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(noise).save(out, format="PNG")
    low, high = (clean_image(out.getvalue(), key="k", quality=q).jpeg for q in (30, 95))
    assert len(low) < len(high) / 2


@pytest.mark.parametrize(
    "kind,reason", [("zero_byte", "zero-byte"), ("truncated", "truncated"), ("not_image", "not an image")]
)
def test_clean_bad_files_raise_naming_the_file(kind, reason):
    data = odd_file(kind, RED, np.random.default_rng(0))
    with pytest.raises(BadImage, match="n01440764_7.JPEG") as err:
        clean_image(data, key="n01440764_7.JPEG", resize_shorter=256)
    assert reason in err.value.reason and err.value.key == "n01440764_7.JPEG"
    assert "BytesIO" not in err.value.reason  # words, not the repr of a buffer
    assert isinstance(err.value, ValueError)


def test_clean_refuses_to_run_with_truncated_loading_on(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        clean_image(image_bytes(RED, (40, 30)), key="k")


# ---------------------------------------------------------------------------------------------
# Layouts


def read_all(units) -> list[imagenet.Record]:
    records = [r for unit in units for r in iter_records(unit)]
    ids = [r.image_id for r in records]
    assert len(ids) == len(set(ids)), "an image came out twice"
    return records


def check_records(records, expected: Expected) -> None:
    """Exactly the expected image_ids and wnids; every label follows its image; odd files behave."""
    assert {r.image_id: r.wnid for r in records} == expected.labels
    for r in records:
        assert r.image_id == f"{r.split}/{r.key.removesuffix('.JPEG')}"
        if r.image_id in expected.bad:
            with pytest.raises(BadImage):
                clean_image(r.data, key=r.key)
            continue
        clean = clean_image(r.data, key=r.key)
        assert bool(clean.note) == (r.image_id in expected.convertible)
        if r.image_id in expected.coloured:
            colour = expected.class_colours[r.wnid]
            assert np.abs(mean_colour(clean.jpeg) - colour).max() < 8, f"{r.image_id} is not {r.wnid}'s colour"


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_extracted_layout(tmp_path):
    expected = write_extracted(tmp_path)
    assert set(expected.bad.values()) == {"truncated", "zero_byte", "not_image"}  # the fixture holds them all
    units = discover_inputs(str(tmp_path))
    assert [(u.split, u.kind) for u in units] == [("train", "files"), ("val", "files")]
    check_records(read_all(units), expected)


@pytest.mark.parametrize("labels", LABEL_KINDS)
def test_flat_val_layout(tmp_path, labels):
    # The labels also cover two images that are absent: a partial val must read fine.
    expected = write_extracted(tmp_path, val=False) | write_flat_val(tmp_path, labels=labels)
    check_records(read_all(discover_inputs(str(tmp_path))), expected)


@pytest.mark.parametrize("labels", LABEL_KINDS)
def test_archive_layout_reads_in_place(tmp_path, labels):
    expected = write_archives(tmp_path, labels=labels)
    before = files_under(tmp_path)
    units = discover_inputs(str(tmp_path))
    assert sorted(u.members[0].wnid for u in units if u.kind == "inner_tar") == sorted(WNIDS)
    assert all(u.count is None for u in units if u.kind == "inner_tar")
    check_records(read_all(units), expected)
    assert files_under(tmp_path) == before  # nothing extracted: still only the tars and the labels
    assert {f for f in before if f.endswith(".tar")} == {imagenet.TRAIN_TAR, imagenet.VAL_TAR}


@pytest.mark.parametrize("train,val", [("extracted", "archive"), ("archive", "flat")])
def test_mixed_layouts(tmp_path, train, val):
    if train == "extracted":
        expected = write_extracted(tmp_path, val=False) | write_archives(tmp_path, train=False)
    else:
        expected = write_archives(tmp_path, val=False) | write_flat_val(tmp_path, labels="ground_truth")
    check_records(read_all(discover_inputs(str(tmp_path))), expected)


def test_units_are_independent_plain_data(tmp_path):
    write_extracted(tmp_path / "a", val=False)
    write_archives(tmp_path / "a", train=False)
    write_archives(tmp_path / "b", val=False, wnids=("n01484850", "n01491361"))  # ids unique across roots
    units = discover_inputs(str(tmp_path / "a")) + discover_inputs(str(tmp_path / "b"))
    shipped = [pickle.loads(pickle.dumps(u)) for u in units]  # as Ray ships them to tasks
    assert shipped == units and all(isinstance(u.uri, str) for u in units)
    forwards = {(r.image_id, r.data) for r in read_all(units)}
    assert {(r.image_id, r.data) for r in read_all(shipped[::-1])} == forwards
    for unit in units:
        records = list(iter_records(unit))
        assert unit.count in (None, len(records)) and unit.nbytes > 0
        if unit.kind != "inner_tar":
            assert unit.nbytes == sum(len(r.data) for r in records)


def test_inner_tar_index_gives_byte_ranges_of_the_outer_archive(tmp_path):
    write_archives(tmp_path, val=False)
    archive = (tmp_path / imagenet.TRAIN_TAR).read_bytes()
    for unit in discover_inputs(str(tmp_path)):
        (inner,) = unit.members
        indexed = imagenet.index_inner_tar(unit)
        with tarfile.open(fileobj=io.BytesIO(archive[inner.offset : inner.offset + inner.size])) as tar:
            files = {f"{inner.name}/{i.name}": tar.extractfile(i).read() for i in tar.getmembers()}
        # Each member's bytes are where the index says, in the outer archive: read in place later.
        assert {m.name: archive[m.offset : m.offset + m.size] for m in indexed.members} == files
        assert {m.wnid for m in indexed.members} == {inner.wnid} and indexed.count == len(files)
        assert indexed.nbytes == sum(len(d) for d in files.values())


def test_label_files_passed_by_uri(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "labels"
    expected = write_flat_val(root, labels="loc", labels_at=elsewhere / "kaggle")
    write_labels(elsewhere / "kit", "ground_truth", {k.removeprefix("val/"): w for k, w in expected.labels.items()})
    write_labels(elsewhere / "tgz", "devkit_tarball", {k.removeprefix("val/"): w for k, w in expected.labels.items()})
    kit = elsewhere / "kit" / devkit.DEVKIT_DIR
    for kwargs in (
        {"val_labels": str(elsewhere / "kaggle" / devkit.LOC_VAL_SOLUTION)},
        {"devkit": str(kit)},
        {"devkit": str(elsewhere / "tgz" / devkit.DEVKIT_TARBALL)},
        {"val_labels": str(kit / devkit.DEVKIT_GROUND_TRUTH), "devkit": str(kit / devkit.DEVKIT_META)},
    ):
        check_records(read_all(discover_inputs(str(root), **kwargs)), expected)
    with pytest.raises(ValueError, match="needs the devkit"):  # ground truth alone cannot name classes
        discover_inputs(str(root), val_labels=str(kit / devkit.DEVKIT_GROUND_TRUTH))


def test_stray_files_are_listed_and_given_a_reason_to_skip(tmp_path):
    expected = write_extracted(tmp_path, bad=False)
    (tmp_path / "train" / "README.txt").write_text("class folders below\n")
    for wnid in WNIDS:  # one in every class folder: ids are paths for such names, so they do not collide
        (tmp_path / "train" / wnid / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    records = {r.image_id: r for r in read_all(discover_inputs(str(tmp_path)))}
    strays = {"train/README.txt", *(f"train/{wnid}/.DS_Store" for wnid in WNIDS)}
    assert records.keys() == expected.labels.keys() | strays
    members = {imagenet.image_id_of(u.split, m.name): m for u in discover_inputs(str(tmp_path)) for m in u.members}
    assert "in no class" in imagenet.skip_reason(members["train/README.txt"])
    assert "not an image file name" in imagenet.skip_reason(members[f"train/{WNIDS[0]}/.DS_Store"])
    assert not any(imagenet.skip_reason(members[i]) for i in expected.labels)


@pytest.mark.parametrize(
    "split,name,image_id",
    [
        ("train", "train/n01440764/n01440764_10026.JPEG", "train/n01440764_10026"),  # extracted
        ("train", "n01440764.tar/n01440764_10026.JPEG", "train/n01440764_10026"),  # inside the train tar
        ("val", "val/n01440764/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000001"),
        ("val", "val/ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000001"),  # flat val
        ("val", "ILSVRC2012_val_00000001.JPEG", "val/ILSVRC2012_val_00000001"),  # in the val tar
        ("train", "train/cat/0.jpg", "train/cat/0.jpg"),  # any ImageFolder
        ("val", "val/cat/0.jpg", "val/cat/0.jpg"),
        ("train", "train/README.txt", "train/README.txt"),
    ],
)
def test_image_ids_imagenet_names_stay_short_other_names_are_paths(split, name, image_id):
    assert imagenet.image_id_of(split, name) == image_id


def test_an_image_folder_with_the_same_names_in_every_class(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for n in range(2):
                (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
                (tmp_path / split / cls / f"{n}.jpg").write_bytes(image_bytes(RED, (40 + c, 30)))
    records = read_all(discover_inputs(str(tmp_path)))
    assert sorted(r.image_id for r in records) == sorted(
        f"{s}/{c}/{n}.jpg" for s in ("train", "val") for c in ("cat", "dog") for n in range(2)
    )
    assert {r.wnid for r in records} == {"cat", "dog"}


# ---------------------------------------------------------------------------------------------
# Clear errors


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"empty.*looked for.*{imagenet.TRAIN_TAR}"):
        discover_inputs(str(tmp_path / "empty"))


@pytest.mark.parametrize("layout", ["flat", "archive"])
def test_val_without_labels(tmp_path, layout):
    if layout == "flat":
        write_flat_val(tmp_path, labels="loc")
    else:
        write_archives(tmp_path, labels="loc", train=False)
    (tmp_path / devkit.LOC_VAL_SOLUTION).unlink()
    with pytest.raises(ValueError, match="no labels: looked for .*LOC_val_solution.csv"):
        discover_inputs(str(tmp_path))


def test_val_image_without_a_label_is_named(tmp_path):
    write_flat_val(tmp_path, labels="loc")
    shutil.copy(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", tmp_path / "val" / "ILSVRC2012_val_00000099.JPEG")
    with pytest.raises(ValueError, match="1 val images have no label .*ILSVRC2012_val_00000099.JPEG"):
        discover_inputs(str(tmp_path))


def test_ground_truth_id_missing_from_meta(tmp_path):
    write_flat_val(tmp_path, labels="ground_truth")
    ground_truth = tmp_path / devkit.DEVKIT_DIR / devkit.DEVKIT_GROUND_TRUTH
    ground_truth.write_text(ground_truth.read_text().replace("1\n", "42\n", 1))
    with pytest.raises(ValueError, match="ILSVRC2012_ID 42"):
        discover_inputs(str(tmp_path))


def test_ambiguous_or_unlabelled_layouts(tmp_path):
    write_extracted(tmp_path / "both", val=False)
    write_archives(tmp_path / "both", val=False)
    with pytest.raises(ValueError, match="both train/ and ILSVRC2012_img_train.tar"):
        discover_inputs(str(tmp_path / "both"))
    flat_train = tmp_path / "flat" / "train"
    flat_train.mkdir(parents=True)
    (flat_train / "n01440764_1.JPEG").write_bytes(image_bytes(RED, (40, 30)))
    with pytest.raises(ValueError, match="no class folders"):
        discover_inputs(str(tmp_path / "flat"))


def test_colliding_image_ids_are_an_error(tmp_path):
    # An ImageNet name is its id whatever the folder or extension: a copy in another class, or as .png.
    name = f"{WNIDS[0]}_1"
    for copy in (f"{WNIDS[1]}/{name}.JPEG", f"{WNIDS[0]}/{name}.png"):
        root = tmp_path / copy.replace("/", "-")
        write_extracted(root, bad=False)
        shutil.copy(root / "train" / WNIDS[0] / f"{name}.JPEG", root / "train" / copy)
        with pytest.raises(ValueError, match=f"'train/{name}' to .*{re.escape(copy)}.*Remove or rename"):
            discover_inputs(str(root))


# ---------------------------------------------------------------------------------------------
# Object storage: the same code path over a real S3 HTTP endpoint (moto's server)


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "moto",
        "AWS_SECRET_ACCESS_KEY": "moto",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    yield
    server.stop()


def test_s3_archives_and_folders(tmp_path, s3_endpoint):
    import boto3
    import pyarrow.fs as pafs

    from pipeline.data.storage import resolve

    expected = write_archives(tmp_path, labels="devkit_tarball", val=True, train=True)
    extracted = write_extracted(tmp_path / "extracted", val=False, wnids=("n01484850",), train_per_class=3, bad=False)
    boto3.client("s3").create_bucket(Bucket="imagenet")
    s3, _ = resolve("s3://imagenet")
    pafs.copy_files(str(tmp_path), "imagenet/raw", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=s3)

    units = discover_inputs("s3://imagenet/raw")
    assert all(u.uri.startswith("s3://imagenet/raw/") for u in units)
    check_records(read_all(pickle.loads(pickle.dumps(units))), expected)
    check_records(read_all(discover_inputs("s3://imagenet/raw/extracted")), extracted)
