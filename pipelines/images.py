"""A user's image file -> uint8 RGB (H, W, 3): the one set of decoding rules.

``fcn predict`` reads its inputs with ``read_rgb``; ingest decodes the photos of a raw dataset
with ``decode_rgb`` (``pipelines.sources.common.decode_image``), so both accept and refuse the
same files, with the same reasons. The choices, each a test in tests/test_images.py:

- RGB as stored. Multi-frame files (GIF, TIFF pages): the first frame.
- 16-bit grayscale (Pillow modes I;16, I;16L, I;16B, I;16N, and I, the mode some writers'
  16-bit PNGs and 32-bit TIFFs open in): value * 255 / 65535, rounded (there are no ties),
  never clamped; mode I values outside 0..65535 are refused, not clipped.
- 16-bit colour PNGs (RGB 48 and RGBA 64 bits a pixel, gray + alpha 32): Pillow keeps only the
  high byte of each sample, so these are decoded by libpng through ``torchvision.io.decode_png``
  (imported for them only) and scaled by the same rule, round(v * 255 / 65535); alpha is
  composited on black at 16 bits before scaling. With a colour-key transparency (tRNS) they go
  through Pillow (high byte), as do files that libpng refuses but Pillow reads, and all of them
  once a torchvision without image codecs is installed (0.29 marks them deprecated; the pinned
  0.29.1 has them, and tests/test_images.py checks the exact rule under the pins).
- Alpha (RGBA, LA, PA, a palette or RGB/L image with a transparent colour): composited on
  black, ``round(colour * alpha / 255)``; a fully transparent pixel is black (0, 0, 0).
  Premultiplied modes (RGBa, La) are already composited on black.
- Palette (P, PA): through the palette (never the raw indices).
- CMYK (Adobe's inverted CMYK JPEGs included), YCbCr, LAB, HSV: Pillow's conversion to RGB.
- Grayscale L; bilevel 1 (0 -> 0, 1 -> 255); float F read as 0..255 intensities (Pillow's
  own convention), rounded, values outside 0..255 or not finite refused: copied to R, G, B.
- EXIF orientation (JPEG, PNG, TIFF, WebP) applied with ``ImageOps.exif_transpose`` when
  ``exif=True`` (``read_rgb``'s default: the photo as every viewer shows it, so a prediction is
  the size of the image the user sees, width and height swapped for orientations 5-8). Ingest
  passes ``exif=False``: a dataset's labels are drawn on the stored pixels. A corrupt EXIF
  block is ignored (no orientation).
- Size: more than ``pixel_limit()`` pixels (``MAX_PIXELS_DEFAULT``, 100 megapixels, or
  ``FCN_MAX_IMAGE_PIXELS``, or the caller's ``max_pixels``) is refused from the header alone,
  before any pixel is decoded. Pillow's own decompression-bomb guard is raised to the limit
  when it is lower (never lowered), so the limit here is the one that speaks; its
  ``DecompressionBombError`` gives the same message.

Every refusal is an ``ImageError``: a ``UserError`` (and a ``ValueError``, as the ingest
decoders raise for one bad example) whose message is one line that starts with its kind and
names the file: ``empty file NAME``, ``missing file NAME``, ``undecodable image NAME: why``,
``truncated image NAME: why``, ``image too large NAME: why``, or, from ``read_rgb``, the
storage layer's ``cannot read LOCATION: why``. File names are never opened with ``open()``:
bytes come from ``pipelines.storage`` (local paths with spaces or non-ASCII names, s3://...).
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines import storage
from pipelines.errors import UsageError, UserError

MAX_PIXELS_DEFAULT = 100_000_000  # 100 megapixels: ~300 MB as uint8 RGB, 1.2 GB as float32
MAX_PIXELS_ENV = "FCN_MAX_IMAGE_PIXELS"

# What Pillow raises for a file it cannot decode (a plugin's SyntaxError, a decoder's OSError,
# a malformed tile's ValueError, EOFError from some readers). Our own errors are raised outside
# the blocks that catch these.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA")


class ImageError(UserError, ValueError):
    """An image file that cannot be used; one line naming the file and the reason."""


def pixel_limit(max_pixels: int | None = None) -> int:
    """The largest image accepted, in pixels: ``max_pixels`` when given, else
    ``FCN_MAX_IMAGE_PIXELS``, else ``MAX_PIXELS_DEFAULT``."""
    if max_pixels is not None:
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise UsageError(f"max_pixels must be a positive whole number of pixels, got "
                             f"{max_pixels!r}")
        return max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PIXELS_DEFAULT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels "
                         f"(e.g. 100000000), got {raw!r}")
    return value


def _too_large(name: str, pixels: int, limit: int, size: tuple[int, int] | None = None) -> str:
    what = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"
    return (f"image too large {name}: {what}, over the limit of {limit:,} "
            f"(set {MAX_PIXELS_ENV} to raise it)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decode_error(name: str, e: BaseException, limit: int) -> ImageError:
    """One of Pillow's errors -> ImageError with its kind."""
    if isinstance(e, Image.DecompressionBombError):
        m = re.search(r"\((\d+) pixels\)", str(e))
        return ImageError(_too_large(name, int(m.group(1)) if m else 0, limit))
    if isinstance(e, UnidentifiedImageError):
        return ImageError(f"undecodable image {name}: not an image file, or a format Pillow "
                          "cannot read")
    if "truncated" in str(e).lower():
        return ImageError(f"truncated image {name}: {_first_line(e)}")
    return ImageError(f"undecodable image {name}: {_first_line(e)}")


def _allow_pillow(limit: int) -> None:
    """Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS at open (a process-wide
    setting): raise it to our limit when it is lower, so it never refuses what we accept."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """round(colour * alpha / 255), uint8; colour (H, W) or (H, W, C), alpha (H, W)."""
    a = alpha.astype(np.uint32)
    if colour.ndim == 3:
        a = a[..., None]
    # colour * alpha / 255 is never exactly k + 0.5 for integers: + 127 then // 255 rounds.
    return ((colour.astype(np.uint32) * a + 127) // 255).astype(np.uint8)


def _gray(g: np.ndarray) -> np.ndarray:
    return np.repeat(g.astype(np.uint8)[..., None], 3, axis=2)


def _sixteen_to_8(im: Image.Image, name: str) -> np.ndarray:
    a = np.asarray(im)
    if im.mode == "I" and a.size and (int(a.min()) < 0 or int(a.max()) > 65535):
        raise ImageError(f"undecodable image {name}: 32-bit values {int(a.min())}.."
                         f"{int(a.max())} are outside 0..65535, the range of a 16-bit image")
    # round(v * 255 / 65535) = (2 * 255 * v + 65535) // (2 * 65535): no ties (65535 is odd
    # and 255 / 65535 = 1 / 257), and at most 33.5 M, so uint32 holds it.
    v = a.astype(np.uint32)
    return _gray((v * 510 + 65535) // 131070)


def _float_to_8(im: Image.Image, name: str) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64)
    if a.size and not (np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 255):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        raise ImageError(f"undecodable image {name}: float values {lo:g}..{hi:g} (or not "
                         "finite) are outside 0..255, the range a float image is read in")
    return _gray(np.round(a))


def _convert(im: Image.Image, mode: str, name: str) -> Image.Image:
    try:
        return im.convert(mode)
    except ValueError as e:  # Pillow: "conversion from X to Y not supported"
        raise ImageError(f"undecodable image {name}: mode {im.mode} cannot be converted to "
                         f"RGB ({_first_line(e)})") from None


def to_rgb(im: Image.Image, name: str) -> np.ndarray:
    """A decoded Pillow image of any mode -> uint8 RGB (H, W, 3) by this module's rules."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return _sixteen_to_8(im, name)
    if mode == "F":
        return _float_to_8(im, name)
    if mode == "P" or mode == "PA" or (mode in ("L", "RGB") and "transparency" in im.info):
        # Through the palette; a transparent index or colour key becomes alpha.
        alpha = mode == "PA" or "transparency" in im.info
        im = _convert(im, "RGBA" if alpha else "RGB", name)
        mode = im.mode
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode == "L":
        return _gray(np.asarray(im))
    if mode == "1":
        return _gray(np.asarray(im, dtype=np.uint8) * 255)
    if mode in _WITH_ALPHA:
        a = np.asarray(im)
        return _composite_on_black(a[..., :-1], a[..., -1]) if mode == "RGBA" else \
            _gray(_composite_on_black(a[..., 0], a[..., 1]))
    if mode == "RGBa":  # premultiplied: already on black
        return np.array(np.asarray(im)[..., :3], dtype=np.uint8)
    if mode == "La":
        return _gray(np.asarray(im)[..., 0])
    return np.array(_convert(im, "RGB", name), dtype=np.uint8)  # CMYK, YCbCr, LAB, HSV


def _png16_colour(data: bytes) -> bool:
    """Whether ``data`` is a PNG whose header says 16 bits a sample with colour or alpha
    (colour types 2, 4, 6): the PNGs Pillow decodes to their high byte."""
    return (len(data) >= 26 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
            and data[24] == 16 and data[25] in (2, 4, 6))


def _scale16(v: np.ndarray) -> np.ndarray:
    """uint16-range integers -> round(v * 255 / 65535) as uint8 (no ties; see _sixteen_to_8)."""
    return ((v.astype(np.uint64) * 510 + 65535) // 131070).astype(np.uint8)


def _png16_rgb(data: bytes) -> np.ndarray | None:
    """A 16-bit colour PNG decoded exactly by libpng (torchvision) -> uint8 RGB, or None when
    libpng refuses it (Pillow then decides)."""
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_png
    except ImportError:  # a later torchvision without its image codecs: Pillow's high byte
        return None
    try:
        with warnings.catch_warnings():  # torchvision 0.29 marks its codecs deprecated
            warnings.filterwarnings("ignore", category=DeprecationWarning,
                                    message="The image decoding and encoding")
            t = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    a = t.permute(1, 2, 0).numpy().astype(np.uint64)  # (H, W, C) as stored, 0..65535
    colour, alpha = (a, None) if a.shape[2] in (1, 3) else (a[..., :-1], a[..., -1:])
    if alpha is not None:  # on black at 16 bits: round(c * alpha / 65535), then scaled
        colour = (colour * alpha + 32767) // 65535
    rgb = _scale16(colour)
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else np.ascontiguousarray(rgb)


def _exif_transposed(rgb: np.ndarray, orientation: int | None) -> np.ndarray:
    """``rgb`` turned as EXIF ``orientation`` says (ImageOps.exif_transpose's table)."""
    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation or 1)
    return rgb if method is None else np.array(Image.fromarray(rgb).transpose(method))


def decode_rgb(data: bytes, name: str, *, exif: bool = True,
               max_pixels: int | None = None) -> np.ndarray:
    """The bytes of an image file -> uint8 RGB (H, W, 3); ``name`` names it in errors.
    ImageError when it is empty, not an image, truncated, corrupt or too large."""
    limit = pixel_limit(max_pixels)
    if not data:
        raise ImageError(f"empty file {name} (0 bytes)")
    _allow_pillow(limit)
    with warnings.catch_warnings():
        # We check the size ourselves; a corrupt EXIF block only means no orientation.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", message="Corrupt EXIF", category=UserWarning)
        try:
            im = Image.open(io.BytesIO(data))  # the header only: no pixel decoded yet
        except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
            raise _decode_error(name, e, limit) from None
        with im:
            w, h = im.size
            if w * h > limit:
                raise ImageError(_too_large(name, w * h, limit, (w, h)))
            if w * h == 0:
                raise ImageError(f"undecodable image {name}: it has no pixels ({w}x{h})")
            try:
                im.load()  # decode now: a truncated file fails here, not at open()
                if _png16_colour(data) and "transparency" not in im.info:
                    exact = _png16_rgb(data)
                    if exact is not None:
                        turn = im.getexif().get(0x0112) if exif else None
                        return _exif_transposed(exact, turn)
                if exif:
                    ImageOps.exif_transpose(im, in_place=True)
            except (*_PIL_ERRORS, Image.DecompressionBombError) as e:
                raise _decode_error(name, e, limit) from None
            return to_rgb(im, name)


def read_rgb(location: str | os.PathLike[str], *, exif: bool = True,
             max_pixels: int | None = None) -> np.ndarray:
    """An image file (a local path or a URI, any file name) -> uint8 RGB (H, W, 3).
    ImageError for a file that is missing, unreadable (permission) or not a usable image;
    a store that does not answer (``StorageError.transient``) is raised as it is: it is no
    file's fault, and every other file would fail the same way."""
    name = storage.name(location)
    try:
        data = storage.read_bytes(location)
    except storage.NotFound:
        raise ImageError(f"missing file {name}: no such file") from None
    except storage.StorageError as e:
        if e.transient:
            raise
        raise ImageError(str(e)) from None
    return decode_rgb(data, name, exif=exif, max_pixels=max_pixels)
