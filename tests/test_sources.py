"""Dataset readers: synthetic round trips, real samples, quarantine rows, strict decoders."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fcn_core.palettes import voc_colormap
from pipelines.sources import (
    LayoutError,
    RawRecord,
    decode_depth,
    decode_image,
    decode_label,
    load_example,
    nyud,
    reference,
    sbd,
    siftflow,
    source,
    synthetic,
    voc,
)

MODULES: dict[str, ModuleType] = {"voc": voc, "sbd": sbd, "nyud": nyud, "siftflow": siftflow}
WRITERS = {
    "voc": synthetic.write_voc,
    "sbd": synthetic.write_sbd,
    "nyud": synthetic.write_nyud,
    "siftflow": synthetic.write_siftflow,
}
SIZE = (40, 56)  # not square, so an H/W swap shows
N_TRAIN, N_VAL = 5, 3


def expected_label(dataset: str, raw: np.ndarray, kind: str = "label") -> np.ndarray:
    """The documented reader shifts applied to file values."""
    if dataset in ("voc", "sbd"):
        return raw.astype(np.uint8)
    raw = raw.astype(np.int64)
    out = raw - 1
    out[np.isin(raw, (0, -1) if kind == "label_geo" else (0,))] = 255
    return out.astype(np.uint8)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthetic.write_all(root, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=3)
    return root


# ------------------------------------------------------------------ synthetic round trips


@pytest.mark.parametrize("dataset", list(MODULES))
def test_synthetic_round_trip(synth_root: Path, dataset: str) -> None:
    mod = MODULES[dataset]
    records, problems = mod.list_records(synth_root / dataset)  # parent: exercises the search
    assert problems == []
    train, val = synthetic.SPLITS[dataset]
    assert Counter(r.split for r in records) == {train: N_TRAIN, val: N_VAL}
    index = {i: k for _, i, k in synthetic.plan(dataset, N_TRAIN, N_VAL)}
    for r in records:
        ex = synthetic.example(dataset, index[r.id], SIZE, seed=3)
        arrays, reason = load_example(r, mod.NUM_CLASSES)
        assert reason is None and arrays is not None
        assert arrays["image"].shape == (*SIZE, 3) and arrays["image"].dtype == np.uint8
        np.testing.assert_array_equal(arrays["label"], expected_label(dataset, ex["label"]))
        np.testing.assert_array_equal(decode_label(r), arrays["label"])
        if dataset == "nyud":  # PNG is lossless: every channel round-trips exactly
            np.testing.assert_array_equal(arrays["image"], ex["image"])
            assert arrays["depth"].dtype == np.uint16
            np.testing.assert_array_equal(arrays["depth"], ex["depth"])
            np.testing.assert_array_equal(arrays["hha"], ex["hha"])
        if dataset == "siftflow":
            geo = decode_label(r, "label_geo")
            want = expected_label(dataset, ex["label_geo"], "label_geo")
            np.testing.assert_array_equal(geo, want)
            assert set(np.unique(geo)) <= {0, 1, 2, 255}


def test_synthetic_voc_is_palette_png_with_border_ring(synth_root: Path) -> None:
    records, _ = voc.list_records(synth_root / "voc")
    with Image.open(records[0].label) as im:
        assert im.mode == "P"
        assert im.getpalette()[:768] == voc_colormap().ravel().tolist()
    values = set().union(*(np.unique(decode_label(r)).tolist() for r in records))
    assert 255 in values and values <= {0, 1, 7, 12, 15, 255}


def test_synthetic_sbd_struct_layout(synth_root: Path) -> None:
    records, _ = sbd.list_records(synth_root / "sbd")
    gt = scipy.io.loadmat(records[0].label)["GTcls"]
    assert gt.shape == (1, 1) and gt[0, 0]["Segmentation"].dtype == np.uint8
    assert gt[0, 0]["Boundaries"].shape == (20, 1)


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = synthetic.example("voc", 4, SIZE, seed=1)
    np.testing.assert_array_equal(a["image"], synthetic.example("voc", 4, SIZE, seed=1)["image"])
    assert not np.array_equal(a["image"], synthetic.example("voc", 4, SIZE, seed=2)["image"])
    p1, p2 = synthetic.write_voc(tmp_path / "a", 2, 1), synthetic.write_voc(tmp_path / "b", 2, 1)
    for rel in ("SegmentationClass/synth_000002.png", "JPEGImages/synth_000000.jpg"):
        assert (p1 / rel).read_bytes() == (p2 / rel).read_bytes()


def test_synthetic_is_learnable_and_has_thin_bars(synth_root: Path) -> None:
    # Colour alone should predict the class: nearest class-mean colour on decoded JPEGs.
    records, _ = voc.list_records(synth_root / "voc")
    pairs = [load_example(r, voc.NUM_CLASSES)[0] for r in records]
    pix = np.concatenate([a["image"].reshape(-1, 3) for a in pairs]).astype(np.float64)
    lab = np.concatenate([a["label"].ravel() for a in pairs])
    keep = lab != 255
    pix, lab = pix[keep], lab[keep]
    classes = np.unique(lab)
    means = np.stack([pix[lab == c].mean(0) for c in classes])
    pred = classes[np.argmin(((pix[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert (pred == lab).mean() > 0.9
    # Thin bars: object pixels whose two opposite neighbours are both background.
    thin = 0
    for i in range(10):
        c = synthetic.scene(0, i, (64, 64)).cls
        fg = c[1:-1, 1:-1] > 0
        thin += int((fg & (c[1:-1, :-2] == 0) & (c[1:-1, 2:] == 0)).sum())
        thin += int((fg & (c[:-2, 1:-1] == 0) & (c[2:, 1:-1] == 0)).sum())
    assert thin > 0


# --------------------------------------------------------------------------- real samples


@pytest.fixture(scope="module")
def real(realdata: Path) -> Path:
    return realdata


def test_real_sbd(real: Path) -> None:
    records, problems = sbd.list_records(real / "sbd")  # parent of dataset/
    assert problems == []
    assert [(r.split, r.id) for r in records] == [("val", "2008_000051"), ("val", "2008_000195")]
    expected = {"2008_000051": ({0, 5, 9, 15}, (371, 500)), "2008_000195": ({0, 4, 15}, (333, 500))}
    for r in records:
        values, shape = expected[r.id]
        assert set(np.unique(decode_label(r)).tolist()) == values
        arrays, reason = load_example(r, sbd.NUM_CLASSES)
        assert reason is None and arrays["image"].shape == (*shape, 3)


def test_real_sbd_empty_train_is_a_valid_split(real: Path) -> None:
    assert sbd.list_records(real / "sbd" / "dataset", splits=["train"]) == ([], [])


def _check_drsleep(records: list[RawRecord], problems: list, split: str) -> None:
    assert len(records) == 1 and len(problems) == 1448
    assert {p.split for p in problems} == {split}
    assert all(p.reason.startswith(f"missing image file JPEGImages/{p.id}.jpg") for p in problems)
    r = records[0]
    assert (r.id, r.split) == ("2007_000129", split)
    assert r.label.endswith("SegmentationClassAug/2007_000129.png")
    assert set(np.unique(decode_label(r)).tolist()) == {0, 2, 15, 255}
    arrays, reason = load_example(r, voc.NUM_CLASSES)
    assert reason is None and arrays["image"].shape == (500, 334, 3)


def test_real_voc_drsleep_imagesets(real: Path) -> None:
    records, problems = voc.list_records(real / "voc" / "drsleep_VOC2012_sample")
    _check_drsleep(records, problems, "val")


def test_real_voc_drsleep_list_file(real: Path) -> None:
    root = real / "voc" / "drsleep_VOC2012_sample"
    _check_drsleep(*voc.list_records(root, split_file="lists/val.txt"), "val")
    _check_drsleep(*voc.list_records(root, split_file=root / "lists" / "val.txt"), "val")


def test_real_voc_labelme_palette_labels(real: Path, tmp_path: Path) -> None:
    root = real / "voc" / "labelme_data_dataset_voc"
    with pytest.raises(LayoutError, match=r"has no ImageSets/Segmentation/ \(its split "
                       r"lists\): name a list of ids with fcn ingest --split-file"):
        voc.list_records(root)  # no ImageSets/ in this sample
    ids = ["2011_000003", "2011_000006", "2011_000025"]
    split = tmp_path / "three.txt"
    split.write_text("\n".join(ids) + "\n")
    records, problems = voc.list_records(root, split_file=str(split))
    assert problems == [] and [r.id for r in records] == ids
    assert {r.split for r in records} == {"three"}
    expected = [{0, 5, 15, 255}, {0, 9, 15, 18, 255}, {0, 6, 7}]
    for r, values in zip(records, expected, strict=True):
        assert set(np.unique(decode_label(r)).tolist()) == values
        assert load_example(r, voc.NUM_CLASSES)[1] is None


def test_real_voc_parent_with_two_layouts_is_refused(real: Path) -> None:
    with pytest.raises(LayoutError, match="several VOC layouts"):
        voc.list_records(real / "voc")


def _real_nyud_layout(real: Path, root: Path, with_txt: bool = True) -> np.ndarray:
    """FCN's nyud layout around the real frame img_5001; returns the generated 'segmentation'."""
    src = real / "nyud" / "charlesCXK_Depth2HHA"
    for sub in ("data/images", "data/depth", "data/hha", "segmentation"):
        (root / sub).mkdir(parents=True)
    shutil.copy(src / "demo-data" / "1.png", root / "data/images/img_5001.png")
    shutil.copy(src / "depth" / "img_5001.png", root / "data/depth/img_5001.png")
    shutil.copy(src / "hha" / "img_5001.png", root / "data/hha/img_5001.png")
    seg = np.random.default_rng(0).integers(0, 41, (425, 560)).astype(np.uint8)
    scipy.io.savemat(root / "segmentation/img_5001.mat", {"segmentation": seg})
    if with_txt:
        (root / "train.txt").write_text("5001\n")
    return seg


def test_real_nyud_frame(real: Path, tmp_path: Path) -> None:
    seg = _real_nyud_layout(real, tmp_path)
    records, problems = nyud.list_records(tmp_path)
    assert problems == [] and len(records) == 1
    arrays, reason = load_example(records[0], nyud.NUM_CLASSES)
    assert reason is None
    src = real / "nyud" / "charlesCXK_Depth2HHA"
    with Image.open(src / "depth" / "img_5001.png") as im:
        depth = np.array(im)
    assert arrays["depth"].dtype == np.uint16 and arrays["depth"].shape == (425, 560)
    np.testing.assert_array_equal(arrays["depth"], depth)
    with Image.open(src / "demo-data/1.png") as rgb, Image.open(src / "hha/img_5001.png") as hha:
        np.testing.assert_array_equal(arrays["image"], np.array(rgb))
        np.testing.assert_array_equal(arrays["hha"], np.array(hha))
    np.testing.assert_array_equal(arrays["label"], expected_label("nyud", seg))


def test_real_nyud_splits_mat(real: Path, tmp_path: Path) -> None:
    mat = real / "nyud" / "nyuv2-python-toolkit_meta" / "splits.mat"
    ids = nyud.read_splits_mat(mat)
    assert (len(ids["trainval"]), len(ids["test"])) == (795, 654)
    first = int(scipy.io.loadmat(mat)["trainNdxs"][0, 0])
    assert ids["trainval"][0] == f"{5000 + first}" == "5003"
    assert "5001" in ids["test"] and "5001" not in ids["trainval"]
    # ... and they are the shipped reference lists: trainval = train + val
    assert set(ids["trainval"]) == set(reference.ids("nyud", "train")) | \
        set(reference.ids("nyud", "val"))
    assert sorted(ids["test"]) == sorted(reference.ids("nyud", "test"))
    # No txt split files: splits.mat at the root gives "trainval" and "test".
    _real_nyud_layout(real, tmp_path, with_txt=False)
    shutil.copy(mat, tmp_path / "splits.mat")
    records, problems = nyud.list_records(tmp_path)
    assert [(r.split, r.id) for r in records] == [("test", "5001")]
    assert Counter(p.split for p in problems) == {"trainval": 795, "test": 653}
    assert problems[0].reason.startswith("missing image file data/images/img_")
    # Named explicitly as split_file, with a filter on splits.
    records, problems = nyud.list_records(tmp_path, splits=["test"], split_file=str(mat))
    assert len(records) == 1 and len(problems) == 653
    # Neither txt lists nor splits.mat: the shipped reference lists (train, val, test).
    (tmp_path / "splits.mat").unlink()
    records, problems = nyud.list_records(tmp_path)
    assert [(r.split, r.id) for r in records] == [("test", "5001")]
    assert Counter(p.split for p in problems) == {"train": 381, "val": 414, "test": 653}


# ---------------------------------------------------------------------- quarantine rows


@pytest.mark.parametrize("dataset", list(MODULES))
def test_problem_rows(tmp_path: Path, dataset: str) -> None:
    base = WRITERS[dataset](tmp_path, 3, 0, SIZE)
    train = synthetic.SPLITS[dataset][0]
    split_file = {"voc": base / "ImageSets" / "Segmentation"}.get(dataset, base) / f"{train}.txt"
    first, second = synthetic.example_id(dataset, 0), synthetic.example_id(dataset, 1)
    ghost = "9999" if dataset == "nyud" else "ghost_0001"
    with split_file.open("a") as f:
        f.write(f"{ghost}\n../../etc/passwd\n{first}\n")
    image_rel = {
        "voc": "JPEGImages/{}.jpg",
        "sbd": "img/{}.jpg",
        "nyud": "data/images/img_{}.png",
        "siftflow": f"Images/{siftflow.CATEGORY_DIR}/{{}}.jpg",
    }[dataset]
    (base / image_rel.format(second)).write_bytes(b"")  # 0-byte file
    records, problems = MODULES[dataset].list_records(base)
    assert sorted(r.id for r in records) == sorted([first, synthetic.example_id(dataset, 2)])
    reasons = {p.id: p.reason for p in problems}
    assert reasons[ghost].startswith(f"missing image file {image_rel.format(ghost)}")
    assert reasons["../../etc/passwd"] == "id escapes the dataset root"
    assert reasons[first] == f"duplicate id in split {train}"
    assert reasons[second] == f"empty file {image_rel.format(second)}"
    assert len(problems) == 4 and {p.dataset for p in problems} == {dataset}


def test_voc_pair_list_lines(tmp_path: Path) -> None:
    base = synthetic.write_voc(tmp_path / "v", 2, 0, SIZE)
    lst = tmp_path / "pairs.txt"
    lst.write_text(
        "/JPEGImages/synth_000000.jpg /SegmentationClass/synth_000000.png\n"
        "/JPEGImages/../../../x.jpg /SegmentationClass/x.png\n"
        "a b c\n"
    )
    records, problems = voc.list_records(tmp_path / "v", split_file=lst)
    assert [(r.split, r.id, r.label) for r in records] == [
        ("pairs", "synth_000000", str(base / "SegmentationClass" / "synth_000000.png"))
    ]
    assert [p.reason for p in problems][0].startswith("malformed line 'a b c' in pairs.txt")
    assert [p.reason for p in problems][1] == "id escapes the dataset root"


def test_nyud_optional_depth(tmp_path: Path) -> None:
    base = synthetic.write_nyud(tmp_path, 2, 0, SIZE)
    (base / "data/depth/img_5002.png").unlink()
    records, problems = nyud.list_records(base)
    assert [p.reason for p in problems] == ["missing depth file data/depth/img_5002.png"]
    shutil.rmtree(base / "data/depth")  # a copy without depth at all: not a problem
    records, problems = nyud.list_records(base)
    assert problems == [] and len(records) == 2
    assert [k for k, _ in records[0].extras] == ["hha"]


def test_siftflow_missing_geo_label(tmp_path: Path) -> None:
    base = synthetic.write_siftflow(tmp_path, 2, 0, SIZE)
    id_ = synthetic.example_id("siftflow", 1)
    (base / "GeoLabels" / siftflow.CATEGORY_DIR / f"{id_}.mat").unlink()
    _, problems = siftflow.list_records(base)
    assert [p.reason for p in problems] == [
        f"missing label_geo file GeoLabels/{siftflow.CATEGORY_DIR}/{id_}.mat"
    ]


# ------------------------------------------------------------------------ load_example


@pytest.fixture
def voc_record(tmp_path: Path) -> RawRecord:
    synthetic.write_voc(tmp_path, 1, 0, SIZE)
    records, _ = voc.list_records(tmp_path)
    return records[0]


def _save_p(path: str, label: np.ndarray) -> None:
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette(voc_colormap().ravel().tolist())
    im.save(path)


def test_label_of_other_size(voc_record: RawRecord) -> None:
    _save_p(voc_record.label, np.zeros((SIZE[0] - 1, SIZE[1]), np.uint8))
    arrays, reason = load_example(voc_record, voc.NUM_CLASSES)
    assert arrays is None and reason == "label size 39x56 does not match image size 40x56 (HxW)"


def test_label_out_of_range(voc_record: RawRecord) -> None:
    label = np.zeros(SIZE, np.uint8)
    label[0, :3] = (30, 21, 255)
    _save_p(voc_record.label, label)
    assert load_example(voc_record, voc.NUM_CLASSES) == (
        None, "label values out of range 0..20 (or 255): [21, 30]"
    )


def test_label_rgb_png_is_refused(voc_record: RawRecord) -> None:
    Image.fromarray(np.zeros((*SIZE, 3), np.uint8)).save(voc_record.label)
    _, reason = load_example(voc_record, voc.NUM_CLASSES)
    assert "has mode RGB; expected P or L" in reason


def test_truncated_jpeg(voc_record: RawRecord) -> None:
    data = Path(voc_record.image).read_bytes()
    Path(voc_record.image).write_bytes(data[: len(data) // 2])
    arrays, reason = load_example(voc_record, voc.NUM_CLASSES)
    assert arrays is None and reason.startswith("truncated image")


def test_garbage_bytes(voc_record: RawRecord) -> None:
    Path(voc_record.image).write_bytes(os.urandom(64) + b"not an image" * 20)
    arrays, reason = load_example(voc_record, voc.NUM_CLASSES)
    assert arrays is None and reason.startswith("undecodable image")


def test_empty_file_decode(tmp_path: Path) -> None:
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="^empty file$"):
        decode_image(tmp_path / "e.jpg")


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpeg_become_rgb(voc_record: RawRecord, mode: str) -> None:
    rgb = decode_image(voc_record.image)
    Image.fromarray(rgb).convert(mode).save(voc_record.image, "JPEG", quality=95)
    with Image.open(voc_record.image) as im:
        assert im.mode == mode
    arrays, reason = load_example(voc_record, voc.NUM_CLASSES)
    assert reason is None and arrays["image"].shape == (*SIZE, 3)
    assert arrays["image"].dtype == np.uint8


def test_nyud_label_out_of_range_and_8bit_depth(tmp_path: Path) -> None:
    base = synthetic.write_nyud(tmp_path, 1, 0, SIZE)
    record = nyud.list_records(base)[0][0]
    seg = np.full(SIZE, 41, np.uint8)  # 41 -> 40, one past the 40 classes
    scipy.io.savemat(record.label, {"segmentation": seg})
    _, reason = load_example(record, nyud.NUM_CLASSES)
    assert reason == "label values out of range 0..39 (or 255): [40]"
    depth_path = dict(record.extras)["depth"]
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(depth_path)
    with pytest.raises(ValueError, match="expected a 16-bit PNG"):
        decode_depth(depth_path)


def test_siftflow_bad_values(tmp_path: Path) -> None:
    base = synthetic.write_siftflow(tmp_path, 1, 0, SIZE)
    record = siftflow.list_records(base)[0][0]
    geo = dict(record.extras)["label_geo"]
    scipy.io.savemat(geo, {"S": np.full(SIZE, 4.0)})
    assert load_example(record, siftflow.NUM_CLASSES)[1] == (
        "label_geo values out of range 0..2 (or 255): [3]"
    )
    scipy.io.savemat(record.label, {"S": np.full(SIZE, -1.0)})  # -1 is void only in GeoLabels
    assert "not classes or void" in load_example(record, siftflow.NUM_CLASSES)[1]


def test_sbd_mat_without_gtcls(tmp_path: Path) -> None:
    base = synthetic.write_sbd(tmp_path, 1, 0, SIZE)
    record = sbd.list_records(base)[0][0]
    scipy.io.savemat(record.label, {"GTinst": np.zeros(SIZE, np.uint8)})
    _, reason = load_example(record, sbd.NUM_CLASSES)
    assert reason == "label synth_000000.mat has no key 'GTcls' (keys: GTinst)"


# --------------------------------------------------------------------------- layout errors


@pytest.mark.parametrize("dataset", list(MODULES))
def test_wrong_root_is_one_line(tmp_path: Path, dataset: str) -> None:
    (tmp_path / "some" / "folder").mkdir(parents=True)
    with pytest.raises(LayoutError) as err:
        MODULES[dataset].list_records(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("no ") and "layout under" in msg and "expected" in msg
    with pytest.raises(LayoutError, match="does not exist"):
        MODULES[dataset].list_records(tmp_path / "absent")


def test_voc_wrong_root_message(tmp_path: Path) -> None:
    with pytest.raises(LayoutError) as err:
        voc.list_records(tmp_path)
    assert str(err.value) == (
        f"no VOC layout under {tmp_path}: expected JPEGImages/, SegmentationClass/ (or "
        "SegmentationClassAug/) and ImageSets/Segmentation/ (VOCdevkit/VOC2012 or its parent)"
    )


def test_unknown_split_and_split_file(synth_root: Path) -> None:
    with pytest.raises(LayoutError, match=r"no split file test\.txt .*available: train, val"):
        voc.list_records(synth_root / "voc", splits=["test"])
    with pytest.raises(LayoutError, match="split file not found"):
        voc.list_records(synth_root / "voc", split_file="nope.txt")
    records, _ = voc.list_records(synth_root / "voc", splits=["val"])
    assert {r.split for r in records} == {"val"} and len(records) == N_VAL
    with pytest.raises(ValueError, match="dataset must be one of"):
        source("cityscapes")
    assert source("nyud") is nyud
