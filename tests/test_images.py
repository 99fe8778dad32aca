"""Inputs users really have: one test per kind of image file (pipelines/images.py), the same
rules in ingest, and `fcn predict` on a mix of good and bad files, with the model resolved
once, on the driver, against the project's tracking URI."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcn_core import fcn8s
from pipelines import images
from pipelines.errors import UsageError, UserError
from pipelines.images import ImageError, decode_rgb, read_rgb

RNG = np.random.default_rng(7)


def rgb(h: int = 32, w: int = 40) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG that only has a header (IHDR, 8-bit RGB) and no pixel data: what a giant image
    looks like to the size check, without anyone writing a giant."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png48(samples: np.ndarray, filter_type: int = 0) -> bytes:
    """A 16-bit-per-sample PNG (Pillow cannot write one): (H, W, C) samples, C = 3 (RGB),
    4 (RGBA) or 2 (gray + alpha); rows filtered with None (0) or Sub (1)."""
    h, w, c = samples.shape
    bpp = 2 * c

    def row(i: int) -> bytes:
        b = np.frombuffer(samples[i].astype(">u2").tobytes(), np.uint8).astype(np.int64)
        if filter_type == 1:
            b = (b - np.concatenate([np.zeros(bpp, np.int64), b[:-bpp]])) % 256
        return bytes([filter_type]) + b.astype(np.uint8).tobytes()

    raw = b"".join(row(i) for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6, 2: 4}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------ formats and modes

def test_rgb_png_is_read_exactly(tmp_path):
    a = rgb()
    got = read_rgb(save(Image.fromarray(a), tmp_path / "a.png"))
    assert got.dtype == np.uint8 and got.shape == (32, 40, 3) and np.array_equal(got, a)


SIXTEEN = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32768, 40000, 65279, 65534, 65535]],
                   dtype=np.uint16)


def scaled(v: np.ndarray) -> np.ndarray:
    """The documented rule, computed independently: round(v * 255 / 65535)."""
    return np.array([[round(int(x) * 255 / 65535) for x in row] for row in v], np.uint8)


def test_16bit_grayscale_png_is_scaled_not_clamped(tmp_path):
    path = save(Image.fromarray(SIXTEEN), tmp_path / "depthlike.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"  # the case under test
    got = read_rgb(path)
    want = scaled(SIXTEEN)
    assert want[0].tolist() == [0, 0, 0, 1, 1, 4]  # 1000 -> 4: scaled, not clamped to 255
    assert want[1, -1] == 255 and want[1, 1] == 128
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=2))


def test_16bit_big_endian_tiff_is_scaled(tmp_path):
    path = save(Image.fromarray(SIXTEEN.astype(">u2")), tmp_path / "be.tif")
    with Image.open(path) as im:
        assert im.mode == "I;16B"
    assert np.array_equal(read_rgb(path)[..., 1], scaled(SIXTEEN))


def test_32bit_integer_image_is_scaled_as_16bit_and_out_of_range_refused(tmp_path):
    path = save(Image.fromarray(SIXTEEN.astype(np.int32)), tmp_path / "i.tif")
    with Image.open(path) as im:
        assert im.mode == "I"
    assert np.array_equal(read_rgb(path)[..., 2], scaled(SIXTEEN))
    too_big = SIXTEEN.astype(np.int32)
    too_big[0, 0] = 70000
    bad = save(Image.fromarray(too_big), tmp_path / "i32.tif")
    with pytest.raises(ImageError, match=r"^undecodable image i32\.tif: .*0\.\.65535"):
        read_rgb(bad)


def test_16bit_colour_png_is_scaled_exactly_not_pillows_high_byte(tmp_path):
    samples = np.array([[[0, 257, 65535], [1000, 33023, 200]],
                        [[128, 129, 32767], [32768, 65279, 65534]]], np.uint16)
    exact = scaled(samples.reshape(2, -1)).reshape(samples.shape)
    assert not np.array_equal(exact, samples // 256)  # the cases tell the two rules apart
    for f in (0, 1):  # unfiltered and Sub-filtered rows
        (tmp_path / f"rgb48-{f}.png").write_bytes(png48(samples, f))
        got = read_rgb(tmp_path / f"rgb48-{f}.png")
        assert got.dtype == np.uint8 and np.array_equal(got, exact)


def test_16bit_rgba_and_gray_alpha_pngs_are_composited_at_16_bits_then_scaled(tmp_path):
    colour = np.array([[[65535, 1000, 40000], [65535, 65535, 65535], [300, 70, 9]]], np.uint16)
    alpha = np.array([[[65535], [32768], [0]]], np.uint16)
    (tmp_path / "rgba64.png").write_bytes(png48(np.concatenate([colour, alpha], axis=2)))
    # composited at 16 bits (round(c * a / 65535)), then the scaling rule
    want = [[[round(round(int(c) * int(a[0]) / 65535) * 255 / 65535) for c in px]
             for px, a in zip(colour[0], alpha[0], strict=True)]]
    assert np.array_equal(read_rgb(tmp_path / "rgba64.png"), np.array(want, np.uint8))
    gray = colour[..., :1]
    (tmp_path / "la32.png").write_bytes(png48(np.concatenate([gray, alpha], axis=2)))
    got = read_rgb(tmp_path / "la32.png")
    assert np.array_equal(got, np.repeat(np.array(want, np.uint8)[..., :1], 3, axis=2))


def test_rgba_is_composited_on_black(tmp_path):
    a = rgb(8, 10)
    alpha = np.zeros((8, 10), np.uint8)
    alpha[:, 3:6] = 128
    alpha[:, 6:] = 255
    path = save(Image.fromarray(np.dstack([a, alpha]), "RGBA"), tmp_path / "rgba.png")
    got = read_rgb(path).astype(int)
    assert (got[:, :3] == 0).all()  # alpha 0 -> black, whatever the colour underneath
    assert np.array_equal(got[:, 6:], a[:, 6:])  # opaque -> the colour
    half = np.floor(a[:, 3:6].astype(int) * 128 / 255 + 0.5)
    assert np.array_equal(got[:, 3:6], half)


def test_la_is_composited_on_black(tmp_path):
    g = RNG.integers(0, 256, (6, 7), dtype=np.uint8)
    alpha = np.tile(np.array([0, 255, 51, 0, 255, 204, 1], np.uint8), (6, 1))
    path = save(Image.fromarray(np.dstack([g, alpha]), "LA"), tmp_path / "la.png")
    got = read_rgb(path)
    want = np.floor(g.astype(int) * alpha / 255 + 0.5).astype(np.uint8)
    assert np.array_equal(got, np.repeat(want[..., None], 3, axis=2))
    assert (got[:, 0] == 0).all() and np.array_equal(got[:, 1, 0], g[:, 1])


def test_palette_is_converted_through_the_palette(tmp_path):
    idx = RNG.integers(0, 4, (9, 11), dtype=np.uint8)
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0], [255, 255, 255]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(colours.ravel().tolist())
    got = read_rgb(save(im, tmp_path / "pal.png"))
    assert np.array_equal(got, colours[idx])  # the colours, never the raw indices


def test_palette_transparent_index_and_pa_are_black(tmp_path):
    idx = np.array([[0, 1], [1, 0]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([10, 20, 30, 200, 100, 50])
    path = save(im, tmp_path / "trns.png", transparency=0)
    assert np.array_equal(read_rgb(path)[idx == 0], np.zeros((2, 3), np.uint8))
    assert np.array_equal(read_rgb(path)[idx == 1], np.array([[200, 100, 50]] * 2, np.uint8))
    pa = im.convert("PA")  # Pillow cannot write PA files: the in-memory mode
    pa.putalpha(Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)))
    assert pa.mode == "PA"
    got = images.to_rgb(pa, "pa")
    assert (got[0, 0] == 0).all() and got[0, 1].tolist() == [200, 100, 50]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((16, 32, 4), np.uint8)
    cmyk[:, :16] = (0, 255, 255, 0)  # red
    cmyk[:, 16:] = (255, 0, 0, 0)  # cyan
    path = save(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    got = read_rgb(path).astype(int)
    assert got.shape == (16, 32, 3)
    assert np.abs(got[4:12, 2:12] - (255, 0, 0)).max() <= 8
    assert np.abs(got[4:12, 20:30] - (0, 255, 255)).max() <= 8


def test_grayscale_and_bilevel_become_three_equal_channels(tmp_path):
    g = RNG.integers(0, 256, (12, 13), dtype=np.uint8)
    got = read_rgb(save(Image.fromarray(g), tmp_path / "gray.png"))
    assert np.array_equal(got, np.dstack([g, g, g]))
    bits = RNG.integers(0, 2, (12, 13)).astype(bool)
    got = read_rgb(save(Image.fromarray(bits), tmp_path / "bits.png"))
    assert np.array_equal(got[..., 0], bits.astype(np.uint8) * 255)


def test_float_image_is_read_as_0_to_255_and_out_of_range_refused(tmp_path):
    f = np.array([[0.0, 0.4, 0.6, 127.5, 254.6, 255.0]], np.float32)
    got = read_rgb(save(Image.fromarray(f), tmp_path / "f.tif"))
    assert got[0, :, 0].tolist() == [0, 0, 1, 128, 255, 255]
    f[0, 0] = -3.0
    with pytest.raises(ImageError, match=r"^undecodable image neg\.tif: float values"):
        read_rgb(save(Image.fromarray(f), tmp_path / "neg.tif"))


def exif_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A 32x48 (HxW) JPEG whose top-left quarter is red, the rest black; returns its pixels."""
    a = np.zeros((32, 48, 3), np.uint8)
    a[:16, :24] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(Image.fromarray(a), path, quality=95, exif=exif.tobytes())
    return a


def test_jpeg_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif_jpeg(path, 6)
    got = read_rgb(path)
    # Orientation 6: the stored image is shown turned 90 degrees clockwise, so it is 48x32
    # and the red quarter (stored top-left) is shown top-right.
    assert got.shape == (48, 32, 3)
    assert np.abs(got[2:22, 18:30].astype(int) - (255, 0, 0)).max() <= 10
    assert got[2:22, 2:14].max() <= 10 and got[26:46, 18:30].max() <= 10
    stored = read_rgb(path, exif=False)
    assert stored.shape == (32, 48, 3)
    assert np.array_equal(got, np.rot90(stored, k=-1))


def test_corrupt_exif_is_ignored(tmp_path):
    path = tmp_path / "bad_exif.jpg"
    exif_jpeg(path, 6)
    data = path.read_bytes()
    i = data.find(b"Exif\x00\x00") + 6
    path.write_bytes(data[:i] + b"II*\x00\xff\xff\xff\x7f" + data[i + 8:])
    assert read_rgb(path).shape == (32, 48, 3)  # no orientation: as stored


# ------------------------------------------------------------------ files that are refused

def jpeg_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused_naming_it(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(rgb(48, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        read_rgb(path)
    assert str(e.value).startswith(f"truncated image cut.{fmt.lower()}: ")
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)


def test_empty_file_is_refused(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=r"^empty file zero\.jpg \(0 bytes\)$"):
        read_rgb(tmp_path / "zero.jpg")


def test_text_file_named_jpg_is_refused(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is a shopping list, not a photo\n")
    with pytest.raises(ImageError, match=r"^undecodable image notes\.jpg: not an image file"):
        read_rgb(tmp_path / "notes.jpg")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ImageError, match=r"^missing file gone\.png"):
        read_rgb(tmp_path / "gone.png")


def test_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    data = jpeg_bytes(rgb(64, 64))
    path.write_bytes(data)
    assert read_rgb(path, max_pixels=64 * 64).shape == (64, 64, 3)  # at the limit: accepted
    with pytest.raises(ImageError, match=r"^image too large big\.jpg: 64x64 = 4,096 pixels, "
                                         r"over the limit of 4,095 \(set FCN_MAX_IMAGE_PIXELS"):
        read_rgb(path, max_pixels=64 * 64 - 1)
    # Refused from the header: a truncated body is never decoded, so it is "too large".
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="^image too large"):
        read_rgb(path, max_pixels=1000)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, "1000")
    with pytest.raises(ImageError, match="over the limit of 1,000"):
        decode_rgb(data, "big.jpg")


def test_giant_headers_are_refused_without_allocating(tmp_path):
    # 12,000 x 12,000 = 144 megapixels: over our 100, under twice Pillow's own guard.
    (tmp_path / "huge.png").write_bytes(png_header(12_000, 12_000))
    with pytest.raises(ImageError, match=r"^image too large huge\.png: 12000x12000 = "
                                         r"144,000,000 pixels, over the limit of 100,000,000"):
        read_rgb(tmp_path / "huge.png")
    # 10^10 pixels: Pillow's DecompressionBombError at open gives the same kind of message.
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))
    with pytest.raises(ImageError, match=r"^image too large bomb\.png: 10,000,000,000 pixels"):
        read_rgb(tmp_path / "bomb.png")


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1e8"])
def test_a_bad_pixel_limit_setting_is_a_usage_error(monkeypatch, value):
    monkeypatch.setenv(images.MAX_PIXELS_ENV, value)
    with pytest.raises(UsageError, match=f"FCN_MAX_IMAGE_PIXELS .* got '{value}'"):
        images.pixel_limit()
    with pytest.raises(UsageError, match="max_pixels"):
        images.pixel_limit(0)


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
    a = rgb()
    path = save(Image.fromarray(a), tmp_path / "vacances d'été" / "été 1.png")
    assert np.array_equal(read_rgb(path), a)
    assert np.array_equal(read_rgb(f"file://{path}"), a)  # a URI with the name as it is
    bad = tmp_path / "vacances d'été" / "ça ne va pas ü.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(ImageError, match="^(undecodable|truncated) image ça ne va pas ü.jpg"):
        read_rgb(bad)


# ------------------------------------------------------------------ ingest: the same rules

def test_ingest_decoder_uses_the_same_rules_and_reasons(tmp_path, monkeypatch):
    from pipelines.sources import decode_image, load_example, voc
    from pipelines.sources import synthetic as synth

    path = save(Image.fromarray(SIXTEEN), tmp_path / "16.png")
    assert np.array_equal(decode_image(path), read_rgb(path))
    rot = tmp_path / "rot.jpg"
    exif_jpeg(rot, 6)
    assert decode_image(rot).shape == (32, 48, 3)  # labels are drawn on the stored pixels

    base = synth.write_voc(tmp_path / "raw", n_train=2, n_val=0, size=(32, 40), seed=2)
    records = voc.list_records(base)[0]
    good, bad = records[0], records[1]
    data = Path(bad.image).read_bytes()
    Path(bad.image).write_bytes(data[: len(data) // 2])
    arrays, reason = load_example(bad, voc.NUM_CLASSES)
    with pytest.raises(ImageError) as e:
        read_rgb(bad.image, exif=False)
    assert arrays is None and reason == str(e.value) and reason.startswith("truncated image")
    arrays, reason = load_example(good, voc.NUM_CLASSES)
    assert reason is None and arrays["image"].shape == (32, 40, 3)
    monkeypatch.setenv(images.MAX_PIXELS_ENV, str(32 * 40 - 1))
    arrays, reason = load_example(good, voc.NUM_CLASSES)
    assert arrays is None and reason.startswith("image too large ")


# ------------------------------------------------------------------ fcn predict

def checkpoint(folder: Path, seed: int = 3, input: str = "rgb", in_channels: int = 3) -> Path:
    """A tiny FCN-8s checkpoint (random score layers, so predictions vary): tensors + plain
    values only, the layout every version of the reader takes."""
    torch.manual_seed(seed)
    model = fcn8s(width=1 / 16, in_channels=in_channels)
    for name, m in model.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "arch": {"kind": "fcn", **model.config.to_dict()},
                "step": 0, "config": {"dataset": "voc", "input": input}},
               folder / "checkpoint.pt")
    return folder


def mixed_folder(root: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Good files (name -> expected output H, W) and bad ones, with hard names."""
    good = {
        "plain": (41, 29), "été 1": (33, 20), "with space": (24, 36), "sixteen": (2, 6),
        "rotated": (48, 32),
    }
    save(Image.fromarray(rgb(41, 29)), root / "plain.jpg")
    save(Image.fromarray(np.dstack([rgb(33, 20), np.full((33, 20), 9, np.uint8)]), "RGBA"),
         root / "sub dir" / "été 1.png")
    save(Image.fromarray(rgb(24, 36)).convert("P"), root / "with space.png")
    save(Image.fromarray(SIXTEEN), root / "sixteen.png")
    exif_jpeg(root / "rotated.jpg", 6)  # stored 32x48, shown (and predicted) 48x32
    data = jpeg_bytes(rgb(40, 40))
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    save(Image.fromarray(rgb(64, 64)), root / "big.png")
    (root / "readme.txt").write_text("not an image suffix: never looked at")
    return good, ["cut.jpg", "empty.png", "notes.jpg", "big.png"]


LIMIT = 48 * 48  # the good files are under it, big.png (64x64) over it


def check_outputs(out: Path, good: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    ids = {}
    for name, shape in good.items():
        a = np.array(Image.open(out / f"{name}.png"))
        assert a.shape == shape and a.dtype == np.uint8 and a.max() < 21, name
        assert np.array(Image.open(out / f"{name}_color.png")).shape == (*shape, 3)
        ids[name] = a
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}{s}.png" for n in good for s in ("", "_color"))
    return ids


def test_output_names_never_let_one_inputs_files_overwrite_anothers():
    from pipelines.predict import _output_names
    from pipelines.storage import path

    def names(*files: str, heads: tuple[str, ...] = ()) -> list[str]:
        return _output_names([path(f"/in/{f}") for f in files], heads)

    assert names("a/x.jpg", "b/x.png", "c/x.jpg") == ["x", "x_1", "x_2"]
    assert names("x.jpg", "x_color.jpg") == ["x", "x_color_1"]  # not x's overlay
    assert names("x_color.jpg", "x.jpg") == ["x_color", "x_1"]
    assert names("x_1.jpg", "a/x.jpg", "b/x.jpg") == ["x_1", "x", "x_2"]
    assert names("x.jpg", "x_geometric.jpg", heads=("geometric",)) == ["x", "x_geometric_1"]
    assert names("x.jpg", "x_geometric.jpg") == ["x", "x_geometric"]


def test_a_two_head_siftflow_net_writes_both_heads_labels(tmp_path):
    """SIFT Flow's net scores 33 semantic and 3 geometric classes: <name>.png holds the first
    head's labels (what the served model answers), <name>_geometric.png the second's, each
    with its overlay, exactly the net's argmax per head; the closing line names both."""
    from fcn_core import fcn16s
    from fcn_core.transforms import image_to_tensor
    from pipelines.predict import predict
    from pipelines.registry import resolve_model
    from pipelines.train.checkpoint import write_checkpoint

    torch.manual_seed(0)
    net = fcn16s(width=1 / 16, heads={"semantic": 33, "geometric": 3})
    for name, m in net.named_modules():
        if name.split(".")[-1].startswith("score_"):
            torch.nn.init.normal_(m.weight, std=1.0)
    write_checkpoint(str(tmp_path / "ck" / "checkpoint.pt"), net,
                     config={"dataset": "siftflow", "input": "rgb"})
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rgb[:, :48] //= 8  # a dark half and a bright one: both heads' labels vary
    save(Image.fromarray(rgb), tmp_path / "in" / "coast.png")
    result = predict(str(tmp_path / "ck"), [str(tmp_path / "in")], str(tmp_path / "out"),
                     log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "coast.png", "coast_color.png", "coast_geometric.png", "coast_geometric_color.png"]
    loaded = resolve_model(str(tmp_path / "ck"))
    with torch.no_grad():
        scores = loaded.net(image_to_tensor(rgb, loaded.mean_bgr)[None])
    for file, head, classes in (("coast.png", "semantic", 33),
                                ("coast_geometric.png", "geometric", 3)):
        got = np.array(Image.open(tmp_path / "out" / file))
        assert np.array_equal(got, scores[head].argmax(1)[0].numpy()), head
        assert got.max() < classes and len(np.unique(got)) > 1, head
    assert "<name>_geometric.png geometric class ids" in result.summary("OUT")


def test_predict_writes_the_good_files_and_reports_and_skips_the_bad(tmp_path):
    from pipelines.predict import predict

    good, bad = mixed_folder(tmp_path / "in")
    lines: list[str] = []
    result = predict(str(checkpoint(tmp_path / "ck")), [str(tmp_path / "in")],
                     str(tmp_path / "out"), max_pixels=LIMIT, log=lines.append)
    check_outputs(tmp_path / "out", good)
    assert len(result.written) == len(good)
    assert sorted(Path(p).name for p, _ in result.skipped) == sorted(bad)
    skipped = [ln for ln in lines if ln.startswith("skipped ")]
    assert len(skipped) == len(bad)
    for name, kind in (("cut.jpg", "truncated image"), ("empty.png", "empty file"),
                       ("notes.jpg", "undecodable image"), ("big.png", "image too large")):
        line = next(ln for ln in skipped if f"/{name}: " in ln)
        assert f": {kind} {name}" in line, line
    assert result.summary("o").endswith(f"skipped {len(bad)} (reasons above)")
    assert not any(ln.startswith("predicted ") for ln in lines), lines  # quick: no progress


def test_predict_shows_progress_at_most_every_few_seconds(tmp_path, monkeypatch):
    import pipelines.predict
    from pipelines.predict import predict

    good, bad = mixed_folder(tmp_path / "in")
    monkeypatch.setattr(pipelines.predict, "PROGRESS_EVERY_S", 0.0)  # a line per image
    lines: list[str] = []
    predict(str(checkpoint(tmp_path / "ck")), [str(tmp_path / "in")], str(tmp_path / "out"),
            max_pixels=LIMIT, log=lines.append)
    n = len(good) + len(bad)
    progress = [ln for ln in lines if ln.startswith("predicted ")]
    assert [ln.split()[1] for ln in progress] == [f"{i}/{n}" for i in range(1, n)], lines
    assert all(ln.endswith(" images/s)") for ln in progress), progress


def test_predict_with_nothing_usable_is_one_user_error(tmp_path):
    from pipelines.predict import predict

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    ck = str(checkpoint(tmp_path / "ck"))
    with pytest.raises(UserError, match=r"^no prediction written: the 1 input skipped"):
        predict(ck, [str(tmp_path / "in" / "empty.jpg"), ], str(tmp_path / "out"),
                log=lambda m: None)
    with pytest.raises(UserError, match=r"^no prediction written: all 2 inputs skipped"):
        predict(ck, [str(tmp_path / "in"), str(tmp_path / "nope.jpg")], str(tmp_path / "out"),
                log=lambda m: None)
    (tmp_path / "in" / "empty.jpg").unlink()
    with pytest.raises(UsageError, match=r"^no image files in "):
        predict(ck, [str(tmp_path / "in")], str(tmp_path / "out"), log=lambda m: None)


@pytest.mark.parametrize(("input", "channels", "flags"),
                         [("hha", 3, "--hha .* or --depth"), ("rgbd", 4, "--depth")])
def test_predict_refuses_a_nyud_model_without_its_depth_or_hha(tmp_path, input, channels,
                                                               flags):
    """A net that reads HHA or RGB-D would be fed the wrong channels from RGB files alone:
    without the files it reads it is refused, naming them, before anything is written."""
    from pipelines.predict import predict

    good, _ = mixed_folder(tmp_path / "in")
    ck = checkpoint(tmp_path / "ck", input=input, in_channels=channels)
    with pytest.raises(UsageError, match=f"reads input='{input}': give {flags}"):
        predict(str(ck), [str(tmp_path / "in")], str(tmp_path / "out"), ray_threshold=1,
                log=lambda m: None)
    assert not (tmp_path / "out").exists()  # refused before anything was done


def test_predict_refuses_a_late_fusion_model_without_hha_or_depth(tmp_path):
    """RGB + HHA late fusion (two streams, six input channels) written by the real checkpoint
    writer: refused like the single-stream depth nets, before any output is written."""
    from fcn_core.fcn import LateFusion, fcn32s
    from pipelines.predict import predict
    from pipelines.train.checkpoint import write_checkpoint

    mixed_folder(tmp_path / "in")
    net = LateFusion(fcn32s(num_classes=40, width=1 / 16), fcn32s(num_classes=40, width=1 / 16))
    (tmp_path / "ck").mkdir()
    write_checkpoint(str(tmp_path / "ck" / "checkpoint.pt"), net,
                     config={"dataset": "nyud", "input": "rgb-hha"})
    with pytest.raises(UsageError, match=r"reads input='rgb-hha': give --hha \(HHA images"):
        predict(str(tmp_path / "ck"), [str(tmp_path / "in")], str(tmp_path / "out"),
                ray_threshold=1, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_predict_from_another_folder_uses_the_project_registry(tmp_path, monkeypatch):
    """Issue 10's first report: after registering into the project's MLflow store,
    `fcn predict --model models:/NAME@champion one.jpg` in another folder failed with
    "Registered Model ... not found" and left a stray mlflow.db there."""
    import mlflow.tracking._tracking_service.utils as mlflow_uri

    from pipelines.predict import predict
    from pipelines.registry import register

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FCN_DATA_DIR", str(tmp_path / "project" / "data"))
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)
    manifest = {"dataset": "voc", "source": {"fingerprint": "f" * 8}, "version": "v1"}
    register(str(checkpoint(tmp_path / "ck")), name="fcn-elsewhere",
             metrics={"mean_iu": 0.5}, split="val", manifest=manifest, config_digest="d",
             log=lambda m: None)
    # A new process: no tracking URI set by the registration above.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)
    elsewhere = tmp_path / "elsewhere"
    save(Image.fromarray(rgb(33, 27)), elsewhere / "one.jpg")
    monkeypatch.chdir(elsewhere)
    result = predict("models:/fcn-elsewhere@champion", ["one.jpg"], "o", log=lambda m: None)
    assert len(result.written) == 1 and not result.skipped
    assert np.array(Image.open(elsewhere / "o" / "one.png")).shape == (33, 27)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["o", "one.jpg"]  # no mlflow.db


def test_predict_on_ray_uses_the_model_resolved_on_the_driver(tmp_path, monkeypatch, ray_local):
    import shutil

    import pipelines.registry
    from pipelines.predict import predict

    good, bad = mixed_folder(tmp_path / "in")
    ck = checkpoint(tmp_path / "ck")
    here = predict(str(ck), [str(tmp_path / "in")], str(tmp_path / "local"), max_pixels=LIMIT,
                   log=lambda m: None)
    calls = []
    real = pipelines.registry.resolve_model

    def resolve_then_delete(uri, tracking_uri=None):
        calls.append(uri)
        loaded = real(uri, tracking_uri)
        shutil.rmtree(ck)  # the actors cannot load it again: they must use this one
        return loaded

    monkeypatch.setattr(pipelines.registry, "resolve_model", resolve_then_delete)
    lines: list[str] = []
    result = predict(str(ck), [str(tmp_path / "in")], str(tmp_path / "ray"), ray_threshold=1,
                     actors=1, max_pixels=LIMIT, log=lines.append)
    assert calls == [str(ck)]
    assert sorted(Path(p).name for p, _ in result.skipped) == sorted(bad)
    assert sum(ln.startswith("skipped ") for ln in lines) == len(bad)
    local, ray = check_outputs(tmp_path / "local", good), check_outputs(tmp_path / "ray", good)
    assert all(np.array_equal(local[n], ray[n]) for n in good)
    assert len(here.written) == len(result.written) == len(good)



def test_a_large_folder_starts_here_and_hands_the_rest_to_ray(tmp_path, ray_local):
    """No --actors: a folder at or over the threshold is predicted in this process while
    that is quick (no Ray line); once the rate says the rest would take longer than the
    hand-off time, the rest goes to Ray Data, and the outputs are the same either way."""
    from pipelines.predict import predict

    good, bad = mixed_folder(tmp_path / "in")
    ck = str(checkpoint(tmp_path / "ck"))
    quick: list[str] = []
    here = predict(ck, [str(tmp_path / "in")], str(tmp_path / "here"), ray_threshold=2,
                   max_pixels=LIMIT, log=quick.append)
    assert not any(ln.startswith("Ray: ") or "Ray Data" in ln for ln in quick), quick
    lines: list[str] = []
    split = predict(ck, [str(tmp_path / "in")], str(tmp_path / "split"), ray_threshold=2,
                    handoff_s=0.0, max_pixels=LIMIT, log=lines.append)
    n = len(good) + len(bad)
    assert f"predicted 2/{n} here; the other {n - 2} (" in "\n".join(lines), lines
    assert any(ln.startswith("Ray: ") for ln in lines), lines
    a, b = check_outputs(tmp_path / "here", good), check_outputs(tmp_path / "split", good)
    assert all(np.array_equal(a[k], b[k]) for k in good)
    assert sorted(here.written) != [] and len(split.written) == len(here.written)
    assert sorted(Path(p).name for p, _ in split.skipped) == sorted(bad)

def test_fcn_predict_exit_codes(tmp_path):
    """The CLI: good and bad files -> exit 0 with one line per skipped file and the count;
    nothing usable -> exit 2 with one error line."""
    good, bad = mixed_folder(tmp_path / "in")
    ck = checkpoint(tmp_path / "ck")
    env = {**os.environ, images.MAX_PIXELS_ENV: str(LIMIT)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model", str(ck),
                           str(tmp_path / "in"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"skipped {len(bad)}" in proc.stdout
    for name in bad:
        assert sum(f"/{name}: " in ln for ln in proc.stdout.splitlines()) == 1, proc.stdout
    check_outputs(tmp_path / "out", good)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "predict", "--model", str(ck),
                           str(tmp_path / "in" / "notes.jpg"), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no prediction written" in proc.stderr and "notes.jpg" in proc.stdout


# The README's image rows that quote a message: input column -> the file's bytes.
README_ROWS = {
    "0-byte file": lambda: b"",
    "a text file named `.jpg`": lambda: b"not an image",
    "truncated JPEG or PNG": lambda: jpeg_bytes(rgb(40, 40))[:600],
    "over the pixel limit (default 100 MP, `--max-pixels`, `FCN_MAX_IMAGE_PIXELS`)":
        lambda: png_header(20_000, 10_000),
}


@pytest.mark.parametrize("row", sorted(README_ROWS))
def test_readme_image_rows_say_what_decoding_says(row):
    """Each such README row's message (NAME the file, W, H and N numbers, ``…`` the rest) is
    what decoding the file says."""
    import re

    prefix = f"| {row} | "
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, f"README has no (or more than one) image row {row!r}"
    shown = re.search(r"`([^`]+)`", lines[0][len(prefix):])
    assert shown, lines[0]
    pattern = re.escape(shown.group(1))
    for word, rx in (("NAME", r"x\.jpg"), ("WxH", r"\d+x\d+"), (r"\ N\ ", r" [\d,]+ "),
                     ("…", ".*")):
        pattern = pattern.replace(word, rx)
    with pytest.raises(ImageError) as err:
        decode_rgb(README_ROWS[row](), "x.jpg")
    assert re.match(pattern, str(err.value)), (
        f"README row {row!r} shows `{shown.group(1)}`; decoding says: {err.value}")


def test_predict_by_shift_and_stitch_and_a_factor_the_stride_refuses(tmp_path):
    """`fcn predict --shift-stitch F` (the paper's §3.2): F = 2 on an FCN-8s writes every
    image, its labels differing from plain prediction; F = 3 does not divide the stride 8
    and is one usage error before anything is written."""
    from fcn_core.inference import InferenceOptions
    from pipelines.predict import predict

    save(Image.fromarray(rgb(40, 44)), tmp_path / "in" / "a.png")
    ck = str(checkpoint(tmp_path / "ck"))
    plain = predict(ck, [str(tmp_path / "in")], str(tmp_path / "p"), log=lambda m: None)
    got = predict(ck, [str(tmp_path / "in")], str(tmp_path / "s"),
                  options=InferenceOptions(shift_stitch=2), log=lambda m: None)
    assert len(got.written) == len(plain.written) == 1
    a = np.array(Image.open(tmp_path / "p" / "a.png"))
    b = np.array(Image.open(tmp_path / "s" / "a.png"))
    assert a.shape == b.shape == (40, 44) and not np.array_equal(a, b)
    with pytest.raises(UsageError, match=r"--shift-stitch 3 with model .*: shift-and-stitch by "
                                         r"3 needs a factor of the net's output stride 8 "
                                         r"\(fcn8s\): use one of 2, 4, 8"):
        predict(ck, [str(tmp_path / "in")], str(tmp_path / "t"),
                options=InferenceOptions(shift_stitch=3), log=lambda m: None)
    assert not (tmp_path / "t").exists()
