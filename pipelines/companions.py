"""The files that go with each RGB image for a NYUD model in ``fcn predict``.

A net that reads HHA, RGB-D or RGB + HHA (late fusion) needs, per image, its HHA encoding
or its depth map. The user names them as files or folders (``--hha``, ``--depth``, and
``--rawdepth`` for the sensor's holes when HHA is computed from depth); each is matched to
an RGB input by file stem (data/images/img_5001.png <-> data/depth/img_5001.png, FCN's NYUD
layout). A single input file and a single companion file pair whatever their names.

What each input needs (``NEEDS``): rgbd reads RGB + depth; hha and rgb-hha read HHA, either
as given or computed from depth here (``pipelines.sources.hha.depth_to_hha``, NYU's colour
camera unless ``camera`` says otherwise: the encoding training used when HHA came from
``fcn ingest --compute-hha``). Every mistake in what was given is one ``UsageError`` before
any work; a frame without its companion, or with one that does not fit (size, mode), is
skipped with a reason and never stops the others.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipelines import images, storage
from pipelines.errors import UsageError
from pipelines.storage import StoragePath

KINDS = ("hha", "depth", "rawdepth")
SUFFIXES = {"hha": (".png",), "depth": (".png",), "rawdepth": (".png",)}
WHAT = {"hha": "HHA image (uint8, 3 channels)", "depth": "depth map (16-bit PNG, mm)",
        "rawdepth": "raw depth map (16-bit PNG, mm, 0 = no reading)"}
GIVE = {"hha": "HHA images, 8-bit with 3 channels", "depth": "depth maps, 16-bit PNG in mm"}
# Per model input: the companions it reads (one of the alternatives, in order of preference).
NEEDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rgb": (), "rgbd": (("depth",),), "hha": (("hha",), ("depth",)),
    "rgb-hha": (("hha",), ("depth",)),
}
Camera = tuple[float, float, float, float]  # fx, fy, cx, cy


@dataclass(frozen=True)
class Sources:
    """What the user named: locations (files or folders) per kind, and the camera for HHA."""
    hha: tuple[str, ...] = ()
    depth: tuple[str, ...] = ()
    rawdepth: tuple[str, ...] = ()
    camera: Camera | None = None  # None: NYU Depth v2's colour camera

    def given(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k)]


@dataclass
class Plan:
    """Per RGB input (by index): its companion locations; and the inputs that have none."""
    files: dict[int, dict[str, str]] = field(default_factory=dict)
    missing: dict[int, str] = field(default_factory=dict)  # index -> why it is skipped


def _flags(kinds: Sequence[str]) -> str:
    return " and ".join(f"--{k}" for k in kinds)


def check(input: str, sources: Sources, model_uri: str) -> tuple[str, ...]:
    """The companion kinds this model will read from ``sources``; a UsageError when what was
    given does not fit the model (nothing for a NYUD net, extras for an RGB one, both
    HHA and depth for an HHA net, raw depth with nothing to compute)."""
    given = sources.given()
    if input == "rgb":
        if given:
            raise UsageError(f"{_flags(given)} with model {model_uri}: it reads RGB images only "
                             "(depth and HHA are for NYUD models of input hha, rgbd or rgb-hha)")
        return ()
    if sources.camera is not None and input == "rgbd":
        raise UsageError(f"--camera with model {model_uri}: it reads depth itself "
                         "(input='rgbd'); the camera is only for computing HHA from --depth")
    options = NEEDS[input]
    for kinds in options:
        if all(k in given for k in kinds):
            chosen = kinds
            break
    else:
        ways = " or ".join(f"{_flags(k)} ({GIVE[k[0]]})" for k in options)
        raise UsageError(f"model {model_uri} reads input={input!r}: give {ways}, files or "
                         "folders matched to the images by file name")
    if "hha" in chosen and "depth" in given:
        raise UsageError(f"--hha and --depth with model {model_uri}: give the HHA images or "
                         "the depth maps to compute them from, not both")
    if sources.rawdepth and "hha" in chosen:
        raise UsageError("--rawdepth marks the holes when HHA is computed from --depth; "
                         "with --hha it has no use")
    if sources.rawdepth and input == "rgbd":
        raise UsageError(f"--rawdepth with model {model_uri}: it reads --depth as it is "
                         "(input='rgbd'); raw depth only matters for computing HHA")
    if sources.camera is not None and "hha" in chosen:
        raise UsageError("--camera is for computing HHA from --depth; with --hha it has no use")
    return chosen + (("rawdepth",) if sources.rawdepth else ())


def _collect(kind: str, locations: Sequence[str]) -> list[StoragePath]:
    found: list[StoragePath] = []
    for item in locations:
        p = storage.path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in SUFFIXES[kind])
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"--{kind} {storage.redact(item)}: no such file or folder")
    if not found:
        raise UsageError(f"--{kind} {', '.join(map(storage.redact, locations))}: no "
                         f"{'/'.join(SUFFIXES[kind])} files there")
    return found


def plan(files: Sequence[StoragePath], kinds: Sequence[str], sources: Sources) -> Plan:
    """Match each kind's files to the RGB ``files`` by stem. Two companions of one kind with
    one stem (which one would be meant?) is a UsageError naming both."""
    out = Plan({i: {} for i in range(len(files))})
    for kind in kinds:
        found = _collect(kind, getattr(sources, kind))
        if len(files) == 1 and len(found) == 1:  # one image, one companion: their names aside
            out.files[0][kind] = str(found[0])
            continue
        by_stem: dict[str, StoragePath] = {}
        for f in found:
            if f.stem in by_stem:
                raise UsageError(f"--{kind}: {storage.redact(str(by_stem[f.stem]))} and "
                                 f"{storage.redact(str(f))} are both named {f.stem!r}; files "
                                 "are matched to images by name, so give each frame once")
            by_stem[f.stem] = f
        for i, f in enumerate(files):
            if f.stem in by_stem:
                out.files[i][kind] = str(by_stem[f.stem])
            elif i not in out.missing:
                where = ", ".join(map(storage.redact, getattr(sources, kind)))
                out.missing[i] = f"no {WHAT[kind]} named {f.stem}.png in --{kind} {where}"
    for i in out.missing:
        del out.files[i]
    return out


def read_hha(location: str, shape: tuple[int, int], max_pixels: int | None = None
             ) -> np.ndarray:
    """uint8 HHA (H, W, 3) as stored: an 8-bit 3-channel PNG of the image's size. Anything
    else (16-bit, gray, alpha, palette) is an ImageError: it is not an HHA encoding."""
    from PIL import Image

    name = storage.name(location)
    try:
        data = storage.read_bytes(location)
    except storage.NotFound:
        raise images.ImageError(f"missing HHA file {name}: no such file") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        mode = "RGB"  # not an image at all, or too large: decode_rgb words it
    if mode != "RGB":
        raise images.ImageError(f"HHA {name} has mode {mode}; expected 8-bit RGB channels "
                                "(H1, H2, A) as the reference HHA PNGs")
    hha = images.decode_rgb(data, name, exif=False, max_pixels=max_pixels)
    _same_size("HHA", name, hha.shape[:2], shape)
    return hha


def read_depth(location: str, shape: tuple[int, int], what: str = "depth") -> np.ndarray:
    """uint16 depth in mm (H, W) of the image's size; an ImageError otherwise."""
    from pipelines.sources.common import decode_depth

    try:
        depth = decode_depth(location)
    except ValueError as e:
        raise images.ImageError(f"{what} {storage.name(location)}: {e}") from None
    _same_size(what, storage.name(location), depth.shape, shape)
    return depth


def _same_size(what: str, name: str, got: tuple[int, ...], want: tuple[int, int]) -> None:
    if tuple(got) != tuple(want):
        raise images.ImageError(f"{what} {name} is {got[1]}x{got[0]} but its image is "
                                f"{want[1]}x{want[0]} (width x height): they must be "
                                "pixel-aligned")


def read_frame(input: str, files: Mapping[str, str], shape: tuple[int, int],
               camera: Camera | None = None, max_pixels: int | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(hha, depth) for one image of ``shape`` as the net of ``input`` reads them; HHA is
    computed from depth when it was not given. An ImageError says why a frame is skipped."""
    hha = read_hha(files["hha"], shape, max_pixels) if "hha" in files else None
    depth = read_depth(files["depth"], shape) if "depth" in files else None
    if input in ("hha", "rgb-hha") and hha is None:
        from pipelines.sources.hha import NYU_INTRINSICS, camera_matrix, depth_to_hha

        raw = read_depth(files["rawdepth"], shape, "raw depth") if "rawdepth" in files else None
        assert depth is not None  # check() chose depth
        try:
            hha = depth_to_hha(depth, raw_mm=raw,
                               camera=camera_matrix(intrinsics=camera or NYU_INTRINSICS))
        except ValueError as e:
            raise images.ImageError(f"no HHA from depth {storage.name(files['depth'])}: "
                                    f"{e}") from None
        depth = None
    return hha, depth
