"""``fcn predict`` of NYUD models: each RGB image with its HHA or depth file, matched by name.

The labels written are exactly those of the net on ``net_input`` of the same arrays (the
input training and evaluation build), with HHA computed from depth (and raw depth) by the
encoder ingest uses when it was not given. A real NYUD frame (``../shared/realdata``) is
used where it matters: the RGB frame, its filled and raw depth, and the reference HHA PNG.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core.fcn import LateFusion, fcn8s
from fcn_core.transforms import net_input
from pipelines.companions import Sources, check
from pipelines.errors import UsageError
from pipelines.predict import predict
from pipelines.registry import resolve_model
from pipelines.sources.hha import depth_to_hha
from pipelines.train.checkpoint import write_checkpoint


def tiny(input: str, seed: int = 0) -> torch.nn.Module:
    """An untrained width-1/16 FCN-8s (two, late fusion, for rgb-hha), random score layers so
    that labels vary across the image."""
    def one(channels: int, s: int) -> torch.nn.Module:
        torch.manual_seed(s)
        net = fcn8s(num_classes=40, width=1 / 16, in_channels=channels)
        for name, m in net.named_modules():
            if name.split(".")[-1].startswith("score_"):
                torch.nn.init.normal_(m.weight, std=1.0)
        return net

    if input == "rgb-hha":
        return LateFusion(one(3, seed), one(3, seed + 1))
    return one(4 if input == "rgbd" else 3, seed)


def nyud_checkpoint(folder: Path, input: str) -> str:
    write_checkpoint(str(folder / "checkpoint.pt"), tiny(input),
                     config={"dataset": "nyud", "input": input})
    return str(folder)


def expected_labels(ck: str, input: str, rgb: np.ndarray, hha: np.ndarray | None = None,
                    depth: np.ndarray | None = None) -> np.ndarray:
    loaded = resolve_model(ck)

    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)[None]

    with torch.no_grad():
        x = net_input(t(rgb), input, loaded.mean_bgr, t(hha), t(depth))
        return loaded.net(x).argmax(1)[0].numpy().astype(np.uint8)


def labels(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def png16(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def png(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def frame(realdata):
    """NYUD img_5001: RGB (1.png, another name than its depth's), depth, raw depth, HHA."""
    src = realdata / "nyud" / "charlesCXK_Depth2HHA"
    return {"rgb": src / "demo-data" / "1.png", "depth": src / "depth" / "img_5001.png",
            "rawdepth": src / "rawdepth" / "img_5001.png", "hha": src / "hha" / "img_5001.png"}


def test_a_late_fusion_model_reads_the_frames_hha_given_or_computed_from_depth(
        tmp_path, frame):
    """RGB + HHA on the real frame: with --hha the reference HHA PNG is read as stored; with
    --depth (and --rawdepth) HHA is computed as ingest's --compute-hha does. One image and
    one file pair although their names differ (1.png, img_5001.png)."""
    ck = nyud_checkpoint(tmp_path / "ck", "rgb-hha")
    rgb = np.array(Image.open(frame["rgb"]))
    depth = np.array(Image.open(frame["depth"])).astype(np.uint16)
    raw = np.array(Image.open(frame["rawdepth"])).astype(np.uint16)
    given = np.array(Image.open(frame["hha"]))
    computed = {"raw": depth_to_hha(depth, raw_mm=raw), "filled": depth_to_hha(depth)}
    assert not np.array_equal(computed["raw"], computed["filled"])  # raw depth changes HHA
    runs = {
        "given": (Sources(hha=(str(frame["hha"]),)), given),
        "raw": (Sources(depth=(str(frame["depth"]),), rawdepth=(str(frame["rawdepth"]),)),
                computed["raw"]),
        "filled": (Sources(depth=(str(frame["depth"]),)), computed["filled"]),
    }
    got = {}
    for name, (sources, hha) in runs.items():
        lines: list[str] = []
        result = predict(ck, [str(frame["rgb"])], str(tmp_path / name), sources=sources,
                         log=lines.append)
        assert not result.skipped and not lines
        got[name] = labels(tmp_path / name / "1.png")
        assert got[name].shape == rgb.shape[:2]
        assert np.array_equal(got[name], expected_labels(ck, "rgb-hha", rgb, hha=hha)), name
        assert len(np.unique(got[name])) > 1
        overlay = np.array(Image.open(tmp_path / name / "1_color.png"))
        assert overlay.shape == rgb.shape  # drawn on the RGB image
    assert not np.array_equal(got["given"], got["raw"])  # the HHA source shows in the labels


def test_an_rgbd_folder_pairs_by_name_and_skips_frames_without_a_fitting_depth(tmp_path):
    """A folder of images and one of depth maps (FCN's data/images, data/depth): each image
    takes the depth of its name; one without a depth map, one whose depth has another size
    and one whose depth is 8-bit are skipped with their reasons, and the others are written."""
    rng = np.random.default_rng(0)
    ck = nyud_checkpoint(tmp_path / "ck", "rgbd")
    data = tmp_path / "data"
    rgbs, depths = {}, {}
    for name in ("img_1", "img_2", "img_3", "img_4", "img_5"):
        rgbs[name] = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
        png(data / "images" / f"{name}.png", rgbs[name])
        depths[name] = rng.integers(0, 9000, (37, 53)).astype(np.uint16)
    depths["img_1"][:4] = 0  # holes are read as 1 mm, as training does
    png16(data / "depth" / "img_1.png", depths["img_1"])
    png16(data / "depth" / "nested" / "img_2.png", depths["img_2"])  # found recursively
    png16(data / "depth" / "img_3.png", depths["img_3"][:30])  # another size
    png(data / "depth" / "img_4.png", (depths["img_4"] // 64).astype(np.uint8))  # 8-bit
    lines: list[str] = []
    result = predict(ck, [str(data / "images")], str(tmp_path / "out"),
                     sources=Sources(depth=(str(data / "depth"),)), log=lines.append)
    assert sorted(Path(p).name for p in result.written) == ["img_1.png", "img_2.png"]
    for name in ("img_1", "img_2"):
        assert np.array_equal(labels(tmp_path / "out" / f"{name}.png"),
                              expected_labels(ck, "rgbd", rgbs[name], depth=depths[name]))
    reasons = {Path(p).name: why for p, why in result.skipped}
    assert reasons["img_3.png"] == ("depth img_3.png is 53x30 but its image is 53x37 (width x "
                                    "height): they must be pixel-aligned")
    assert reasons["img_4.png"].startswith("depth img_4.png: depth img_4.png has mode L; "
                                           "expected a 16-bit PNG")
    assert reasons["img_5.png"].startswith("no depth map (16-bit PNG, mm) named img_5.png in "
                                           "--depth ")
    assert sorted(reasons) == ["img_3.png", "img_4.png", "img_5.png"]
    assert [ln.split(":")[0] for ln in lines] == [f"skipped {data / 'images' / n}.png"
                                                  for n in ("img_5", "img_3", "img_4")]


def test_an_hha_image_that_is_not_8_bit_rgb_is_skipped_by_name(tmp_path):
    ck = nyud_checkpoint(tmp_path / "ck", "hha")
    rgb = np.zeros((20, 30, 3), np.uint8)
    png(tmp_path / "in" / "a.png", rgb)
    png(tmp_path / "in" / "b.png", rgb)
    png(tmp_path / "hha" / "a.png", np.full((20, 30), 7, np.uint8))  # gray
    hha = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png(tmp_path / "hha" / "b.png", hha)
    result = predict(ck, [str(tmp_path / "in")], str(tmp_path / "out"),
                     sources=Sources(hha=(str(tmp_path / "hha"),)), log=lambda m: None)
    assert [Path(p).name for p, _ in result.skipped] == ["a.png"]
    assert result.skipped[0][1] == ("HHA a.png has mode L; expected 8-bit RGB channels "
                                    "(H1, H2, A) as the reference HHA PNGs")
    assert np.array_equal(labels(tmp_path / "out" / "b.png"),
                          expected_labels(ck, "hha", rgb, hha=hha))


@pytest.mark.parametrize(("input", "sources", "message"), [
    ("rgb", Sources(depth=("d",)), r"^--depth with model M: it reads RGB images only"),
    ("rgb", Sources(hha=("h",), camera=(1, 1, 0, 0)),
     r"^--hha with model M: it reads RGB images only"),
    ("rgbd", Sources(), r"^model M reads input='rgbd': give --depth \(depth maps, 16-bit "
                        r"PNG in mm\), files or folders matched to the images by file name$"),
    ("rgbd", Sources(hha=("h",)), r"^model M reads input='rgbd': give --depth"),
    ("rgbd", Sources(depth=("d",), rawdepth=("r",)), r"^--rawdepth with model M: it reads "
                                                     r"--depth as it is"),
    ("rgbd", Sources(depth=("d",), camera=(1, 1, 0, 0)), r"^--camera with model M"),
    ("hha", Sources(), r"^model M reads input='hha': give --hha \(HHA images, 8-bit with 3 "
                       r"channels\) or --depth \(depth maps, 16-bit PNG in mm\), files"),
    ("rgb-hha", Sources(rawdepth=("r",)), r"^model M reads input='rgb-hha': give --hha "
                                          r"\(HHA .* or --depth \(depth"),
    ("hha", Sources(hha=("h",), depth=("d",)), r"^--hha and --depth with model M: give the "
                                               r"HHA images or the depth maps"),
    ("rgb-hha", Sources(hha=("h",), rawdepth=("r",)), r"^--rawdepth marks the holes"),
    ("hha", Sources(hha=("h",), camera=(1, 1, 0, 0)), r"^--camera is for computing HHA"),
])
def test_what_was_given_must_fit_what_the_model_reads(input, sources, message):
    with pytest.raises(UsageError, match=message):
        check(input, sources, "M")


@pytest.mark.parametrize(("input", "sources", "kinds"), [
    ("rgb", Sources(), ()),
    ("rgbd", Sources(depth=("d",)), ("depth",)),
    ("hha", Sources(hha=("h",)), ("hha",)),
    ("rgb-hha", Sources(depth=("d",), rawdepth=("r",), camera=(500, 500, 300, 200)),
     ("depth", "rawdepth")),
])
def test_the_files_each_model_reads(input, sources, kinds):
    assert check(input, sources, "M") == kinds


def test_two_files_of_one_name_or_a_missing_folder_are_usage_errors(tmp_path):
    ck = nyud_checkpoint(tmp_path / "ck", "rgbd")
    for name in ("a", "b"):
        png(tmp_path / "in" / f"{name}.png", np.zeros((8, 8, 3), np.uint8))
    png16(tmp_path / "d1" / "a.png", np.ones((8, 8)))
    png16(tmp_path / "d2" / "a.png", np.ones((8, 8)))
    with pytest.raises(UsageError, match=r"^--depth: .*d1/a.png and .*d2/a.png are both named "
                                         r"'a'; files are matched to images by name"):
        predict(ck, [str(tmp_path / "in")], str(tmp_path / "out"), log=lambda m: None,
                sources=Sources(depth=(str(tmp_path / "d1"), str(tmp_path / "d2"))))
    with pytest.raises(UsageError, match=r"^--depth .*nope: no such file or folder$"):
        predict(ck, [str(tmp_path / "in")], str(tmp_path / "out"), log=lambda m: None,
                sources=Sources(depth=(str(tmp_path / "nope"),)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"^--depth .*empty: no .png files there$"):
        predict(ck, [str(tmp_path / "in")], str(tmp_path / "out"), log=lambda m: None,
                sources=Sources(depth=(str(tmp_path / "empty"),)))
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_fcn_predict_takes_depth_files_and_refuses_a_model_without_them(tmp_path, frame):
    """Through the CLI: an RGB-D model with --depth writes its labels; without --depth it is
    one line, exit 2, naming the flag; a malformed --camera is argparse's error."""
    ck = nyud_checkpoint(tmp_path / "ck", "rgbd")
    fcn = Path(sys.executable).with_name("fcn")
    base = [str(fcn), "predict", "--model", ck, str(frame["rgb"]), "--out", str(tmp_path / "o")]
    r = subprocess.run(base + ["--depth", str(frame["depth"])], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote 1 prediction(s) to {tmp_path / 'o'}" in r.stdout
    rgb = np.array(Image.open(frame["rgb"]))
    depth = np.array(Image.open(frame["depth"])).astype(np.uint16)
    assert np.array_equal(labels(tmp_path / "o" / "1.png"),
                          expected_labels(ck, "rgbd", rgb, depth=depth))
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"fcn predict: error: model {ck} reads input='rgbd': give --depth "
                     "(depth maps, 16-bit PNG in mm), files or folders matched to the images "
                     "by file name"]
    r = subprocess.run(base + ["--camera", "1,2,3"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert "argument --camera: expected FX,FY,CX,CY (four numbers in pixels), got '1,2,3'" \
        in r.stderr


def test_ray_actors_read_the_same_frames(tmp_path, frame, ray_local):
    """The Ray Data path carries each image's files to the actors: the same labels as here."""
    ck = nyud_checkpoint(tmp_path / "ck", "rgb-hha")
    sources = Sources(depth=(str(frame["depth"]),), rawdepth=(str(frame["rawdepth"]),))
    predict(ck, [str(frame["rgb"])], str(tmp_path / "here"), sources=sources,
            log=lambda m: None)
    result = predict(ck, [str(frame["rgb"])], str(tmp_path / "ray"), sources=sources,
                     actors=1, log=lambda m: None)
    assert len(result.written) == 1 and not result.skipped
    assert np.array_equal(labels(tmp_path / "ray" / "1.png"), labels(tmp_path / "here" / "1.png"))
