"""PASCAL-Context 59: the synthetic writer, the reader, the label mapping of the reference
pascalcontext_layers.py, quarantine rows and layout errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from pipelines.sources import LayoutError, Problem, context, load_example, reference, synthetic
from pipelines.sources.common import decode_label

N_TRAIN, N_VAL = 4, 3
SIZE = (24, 40)  # not square, so an H/W swap shows

# The release's labels.txt line of each of the 59 classes, in 59_labels.txt order (from FCN's
# data/pascal-context/classes-400.txt, which is the release's 459-line labels.txt): e.g.
# diningtable -> 397 'table', bedcloth -> 19 'bedclothes', clothes -> 80 'cloth'.
RELEASE_INDEX = (
    2, 23, 25, 31, 34, 45, 59, 65, 72, 98, 397, 113, 207, 258, 284, 308, 347, 368, 416, 427,
    9, 18, 22, 33, 44, 46, 68, 80, 85, 104, 115, 144, 158, 159, 162, 187, 189, 220, 232, 259,
    260, 105, 296, 355, 295, 324, 326, 349, 354, 360, 366, 19, 415, 420, 424, 440, 445, 454,
    458,
)
# Names of the release that look like, but are not, classes of the 59 task.
RELEASE_DECOYS = {3: "air conditioner", 81: "clothes tree", 304: "pool table", 398: "tableware"}


@pytest.fixture(autouse=True)
def _fresh_lookup():
    """Tests rewrite labels.txt in place; the per-process table must not outlive one."""
    context.lookup.cache_clear()
    yield
    context.lookup.cache_clear()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    return synthetic.write_context(tmp_path, n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=5)


def _names(path: Path) -> list[str]:
    return [ln.split(":", 1)[1].strip() for ln in path.read_text().splitlines() if ln.strip()]


def _expected(i: int) -> np.ndarray:
    s = synthetic.scene(5, i, SIZE)
    want = synthetic.CONTEXT_IDS[s.cls]
    want[s.ring] = 0  # the ring is 'accordion', outside the 59: background, not 255
    return want


def _write_release_like(ctx: Path) -> None:
    """A 459-line labels.txt with the 59 (and the decoys) at their release line numbers."""
    task = reference.numbered_classes("pascal-context", "classes-59")[1:]
    full = {i: f"unlisted thing {i}" for i in range(1, 460)}
    full.update(RELEASE_DECOYS)
    for name, i in zip(task, RELEASE_INDEX, strict=True):
        full[i] = context.RENAMED.get(name, name)
    (ctx / "labels.txt").write_text("".join(f"{i}: {full[i]}\n" for i in range(1, 460)))


# ------------------------------------------------------------------------------ round trip

def test_classes_are_the_shipped_59_with_background() -> None:
    assert context.NAME == "context" and context.NUM_CLASSES == len(context.CLASSES) == 60
    assert context.CLASSES[0] == "background" and context.CLASSES[1] == "aeroplane"
    assert (context.CLASSES[11], context.CLASSES[28], context.CLASSES[52]) == (
        "diningtable", "clothes", "bedcloth")
    assert context.CLASSES[59] == "wood" and len(set(context.CLASSES)) == 60


def test_writer_files_are_the_release_formats(trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    assert voc.name == "VOC2010" and voc.parent.name == "VOCdevkit"
    labels = _names(ctx / "labels.txt")
    assert len(labels) > 59 and len(set(labels)) == len(labels)
    assert {"table", "bedclothes", "cloth", "air conditioner", "accordion"} <= set(labels)
    assert not {"diningtable", "bedcloth", "clothes"} & set(labels)
    first = (ctx / "labels.txt").read_text().splitlines()[0]
    assert first == f"1: {labels[0]}"  # 'idx: name' lines, numbered from 1
    # 59_labels.txt is the release's 59 list: our classes-59.txt without background
    assert _names(ctx / "59_labels.txt") == list(context.CLASSES[1:])
    mat = scipy.io.loadmat(ctx / "trainval" / "2010_000000.mat")
    lm = mat["LabelMap"]
    assert lm.shape == SIZE and lm.min() >= 1 and lm.max() <= len(labels)


def test_round_trip(trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    records, problems = context.list_records(voc, ctx)
    assert problems == []
    main = voc / "ImageSets" / "Main"
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        ids = [r.id for r in records if r.split == split]
        assert ids == main.joinpath(f"{split}.txt").read_text().split() and len(ids) == n
    assert {r.split for r in records} == {"train", "val"}  # aeroplane_train.txt is no split
    for i, rec in enumerate(records):
        assert rec.dataset == "context" and rec.label_format == "context-mat"
        assert rec.extras == ()
        assert rec.image == str(voc / "JPEGImages" / f"{rec.id}.jpg")
        assert rec.label == str(ctx / "trainval" / f"{rec.id}.mat")
        arrays, why = load_example(rec, context.NUM_CLASSES)
        assert why is None, why
        assert arrays["image"].shape == (*SIZE, 3)
        want = _expected(i)
        assert arrays["label"].dtype == np.uint8 and np.array_equal(arrays["label"], want)
        assert 255 not in arrays["label"]
    # the scenes really hold background, a non-59 ring and renamed classes
    got = np.concatenate([_expected(i).ravel() for i in range(N_TRAIN + N_VAL)])
    assert {0, 1, 11, 52} <= set(got.tolist())


def test_non_59_classes_are_background_and_renamed_ones_keep_their_place(
        trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    records, _ = context.list_records(voc, ctx, splits=["train"])
    labels = [n.replace(" ", "") for n in _names(ctx / "labels.txt")]
    # every value of labels.txt, one per pixel, in a map the size of the image
    h, w = SIZE
    values = np.arange(1, len(labels) + 1)
    lm = np.resize(values, h * w).reshape(h, w).astype(np.uint16)
    assert len(labels) <= h * w
    scipy.io.savemat(ctx / "trainval" / f"{records[0].id}.mat", {"LabelMap": lm})
    label = decode_label(records[0])
    task = list(context.CLASSES)
    for v, name in enumerate(labels, start=1):
        got = set(label[lm == v].tolist())
        inverse = {full: k for k, full in context.RENAMED.items()}
        want = task.index(inverse.get(name, name)) if inverse.get(name, name) in task else 0
        assert got == {want}, (v, name)
    for full, k in (("table", 11), ("cloth", 28), ("bedclothes", 52), ("sky", 50)):
        assert set(label[lm == labels.index(full) + 1].tolist()) == {k}, full
    for decoy in ("airconditioner", "clothestree", "pooltable", "tableware", "accordion"):
        assert set(label[lm == labels.index(decoy) + 1].tolist()) == {0}, decoy


def test_release_line_numbers_map_as_the_reference(trees: tuple[Path, Path]) -> None:
    """With the release's numbering, LabelMap value RELEASE_INDEX[k] is class k + 1."""
    voc, ctx = trees
    _write_release_like(ctx)
    records, _ = context.list_records(voc, ctx, splits=["val"])
    lm = np.zeros(SIZE, np.float64)  # MATLAB doubles, as the release stores them
    flat = lm.ravel()
    flat[:460] = np.arange(460)  # 0 (unlabelled) and every line of labels.txt
    scipy.io.savemat(ctx / "trainval" / f"{records[0].id}.mat", {"LabelMap": lm})
    arrays, why = load_example(records[0], context.NUM_CLASSES)
    assert why is None, why
    got = arrays["label"].ravel()[:460]
    want = np.zeros(460, np.uint8)
    want[list(RELEASE_INDEX)] = np.arange(1, 60)
    assert np.array_equal(got, want)
    assert got[397] == 11 and got[19] == 52 and got[80] == 28  # table, bedclothes, cloth
    assert got[[3, 81, 304, 398]].tolist() == [0, 0, 0, 0]  # the decoys


def test_each_context_root_has_its_own_table(tmp_path: Path) -> None:
    """Two releases in one process: the table is cached per root, not once for all."""
    voc_a, ctx_a = synthetic.write_context(tmp_path / "a", n_train=1, n_val=1, size=SIZE, seed=5)
    voc_b, ctx_b = synthetic.write_context(tmp_path / "b", n_train=1, n_val=1, size=SIZE, seed=5)
    # b: the same names in reverse order, its LabelMaps renumbered to match
    names = _names(ctx_b / "labels.txt")
    n = len(names)
    (ctx_b / "labels.txt").write_text(
        "".join(f"{i}: {name}\n" for i, name in enumerate(reversed(names), 1)))
    for mat in (ctx_b / "trainval").glob("*.mat"):
        lm = scipy.io.loadmat(mat)["LabelMap"].astype(np.int64)
        scipy.io.savemat(mat, {"LabelMap": (n + 1 - lm).astype(np.uint16)})
    rec_a = context.list_records(voc_a, ctx_a, splits=["train"])[0][0]
    rec_b = context.list_records(voc_b, ctx_b, splits=["train"])[0][0]
    assert np.array_equal(decode_label(rec_a), _expected(0))
    assert np.array_equal(decode_label(rec_b), _expected(0))
    assert not np.array_equal(context.lookup(str(ctx_a)), context.lookup(str(ctx_b)))
    with pytest.raises(ValueError):
        context.lookup(str(ctx_a))[1] = 7  # the shared table is read-only


def test_file_uris(trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    records, problems = context.list_records(voc.as_uri(), ctx.parent.as_uri())
    assert problems == [] and len(records) == N_TRAIN + N_VAL
    arrays, why = load_example(records[0], context.NUM_CLASSES)
    assert why is None and np.array_equal(arrays["label"], _expected(0))


# ----------------------------------------------------------------------- splits and roots

def test_splits_split_file_and_parents(trees: tuple[Path, Path], tmp_path: Path) -> None:
    voc, ctx = trees
    val, _ = context.list_records(voc, ctx, splits=["val"])
    assert [r.split for r in val] == ["val"] * N_VAL
    custom = tmp_path / "mine.txt"
    custom.write_text(f"{val[1].id}\n\n{val[0].id}\n")
    mine, _ = context.list_records(voc, ctx, split_file=custom)
    assert [(r.split, r.id) for r in mine] == [("mine", val[1].id), ("mine", val[0].id)]
    # the folder above VOCdevkit and the folder above pascal-context are found too
    both = context.find_roots(tmp_path, tmp_path)
    assert both == context.find_roots(voc, ctx)
    assert [str(p) for p in both] == [str(voc), str(ctx)]
    with pytest.raises(LayoutError, match="no split file test.txt"):
        context.list_records(voc, ctx, splits=["test"])


def test_voc2012_beside_voc2010_is_not_taken(trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    other = voc.parent / "VOC2012"
    shutil.copytree(voc, other)
    vbase, _ = context.find_roots(voc.parent, ctx)
    assert str(vbase) == str(voc)
    shutil.rmtree(voc)
    with pytest.raises(LayoutError, match="no VOC2010 layout under .*VOC2010 only"):
        context.find_roots(other, ctx)


@pytest.mark.parametrize("broken, match", [
    ("no-voc", "no VOC2010 layout under .*: the folder does not exist"),
    ("no-main", "no VOC2010 layout under .*: expected JPEGImages/ and ImageSets/Main/"),
    ("no-trainval", "no PASCAL-Context layout under .*: expected trainval/"),
    ("no-labels", "no PASCAL-Context layout under .*labels.txt and 59_labels.txt"),
    ("no-59", "PASCAL-Context at .* has no 59_labels.txt"),
    ("wrong-59", "59_labels.txt at .* does not list the 59 classes"),
    ("short-labels", "labels.txt at .* has no class 'cloth' .*'clothes'"),
])
def test_layout_errors_are_one_line(trees: tuple[Path, Path], broken: str, match: str) -> None:
    voc, ctx = trees
    if broken == "no-voc":
        voc = voc / "missing"
    elif broken == "no-main":
        shutil.rmtree(voc / "ImageSets")
    elif broken == "no-trainval":
        shutil.rmtree(ctx / "trainval")
    elif broken == "no-labels":
        (ctx / "labels.txt").unlink()
    elif broken == "no-59":
        (ctx / "59_labels.txt").unlink()
    elif broken == "wrong-59":  # the 59 in another order
        names = _names(ctx / "59_labels.txt")
        names[0], names[1] = names[1], names[0]
        (ctx / "59_labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)))
    elif broken == "short-labels":
        names = [n for n in _names(ctx / "labels.txt") if n != "cloth"]
        (ctx / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)))
    with pytest.raises(LayoutError, match=match) as e:
        context.list_records(voc, ctx)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- quarantine rows

def test_problem_rows(trees: tuple[Path, Path]) -> None:
    voc, ctx = trees
    main = voc / "ImageSets" / "Main"
    train = main.joinpath("train.txt").read_text().split()
    (ctx / "trainval" / f"{train[0]}.mat").unlink()
    (voc / "JPEGImages" / f"{train[1]}.jpg").unlink()
    (ctx / "trainval" / f"{train[2]}.mat").write_bytes(b"")
    main.joinpath("train.txt").write_text("\n".join([*train, train[3], "../escape", "absent"]))
    records, problems = context.list_records(voc, ctx)
    assert [r.id for r in records if r.split == "train"] == [train[3]]
    assert len([r for r in records if r.split == "val"]) == N_VAL
    source = str(main / "train.txt")
    assert problems == [
        Problem("context", "train", train[0], str(ctx / "trainval" / f"{train[0]}.mat"),
                f"missing label file trainval/{train[0]}.mat"),
        Problem("context", "train", train[1], str(voc / "JPEGImages" / f"{train[1]}.jpg"),
                f"missing image file JPEGImages/{train[1]}.jpg"),
        Problem("context", "train", train[2], str(ctx / "trainval" / f"{train[2]}.mat"),
                f"empty file trainval/{train[2]}.mat"),
        Problem("context", "train", train[3], source, "duplicate id in split train"),
        Problem("context", "train", "../escape", source, "id escapes the dataset root"),
        Problem("context", "train", "absent", str(voc / "JPEGImages" / "absent.jpg"),
                "missing image file JPEGImages/absent.jpg; missing label file trainval/absent.mat"),
    ]


@pytest.mark.parametrize("content, reason", [
    ({"Labels": np.ones(SIZE, np.uint16)}, "has no key 'LabelMap' (keys: Labels)"),
    ({"LabelMap": np.full(SIZE, 1.5)}, "non-integral values"),
    ({"LabelMap": np.full(SIZE, np.nan)}, "non-integral values"),
    ({"LabelMap": np.full(SIZE, 999, np.uint16)}, "LabelMap values outside 0.."),
    ({"LabelMap": np.full(SIZE, -1, np.int16)}, "LabelMap values outside 0.."),
    ({"LabelMap": np.ones((*SIZE, 2), np.uint16)}, "expected a 2-D numeric map"),
    ({"LabelMap": np.ones((SIZE[1], SIZE[0]), np.uint16)}, "label size 40x24 does not match"),
    (b"MATLAB 5.0 MAT-file, garbage", "undecodable label"),
    ("truncated", "undecodable label"),
])
def test_bad_label_map_is_a_quarantine_reason(trees: tuple[Path, Path], content,
                                              reason: str) -> None:
    voc, ctx = trees
    rec = context.list_records(voc, ctx, splits=["val"])[0][0]
    mat = Path(rec.label)
    if content == "truncated":  # a download cut off inside the 128-byte header
        mat.write_bytes(mat.read_bytes()[:100])
    elif isinstance(content, bytes):
        mat.write_bytes(content)
    else:
        scipy.io.savemat(mat, content)
    arrays, why = load_example(rec, context.NUM_CLASSES)
    assert arrays is None and why is not None and reason in why and "\n" not in why
    if "outside" in why:
        n = len(_names(ctx / "labels.txt"))
        assert f"outside 0..{n} (the classes of labels.txt)" in why
