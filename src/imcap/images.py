"""Images in: every supported input (path, bytes, numpy array, PIL image) as an upright RGB picture.

This is the one module that decodes images. Whatever the file, the result is either an RGB `PIL.Image`
or an `ImageLoadError` whose message names the path and the reason, never another exception: a batch of
thousands of photos always holds a few broken ones, and those must not stop it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 64 megapixels: above any camera users caption (phones reach 50 MP, full-frame bodies 61 MP), and an 8-bit
# RGB decode of it is ~190 MB. Pillow's own guard (MAX_IMAGE_PIXELS, ~89 MP warning, ~179 MP error) is a
# process-wide global, so we check the header size against our own per-call limit before decoding.
DEFAULT_MAX_PIXELS = 64_000_000
# The six formats users expect. Pillow opens ~40 more, some through external programs (EPS runs
# Ghostscript), so untrusted batch input is limited to these. The JPEG reader also opens MPO (phone JPEGs).
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, TIFF or GIF"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}  # what folder scans take
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a browser shows them
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # "I": how some readers hand over 16-bit data

ImageInput = str | Path | Image.Image | bytes | bytearray | np.ndarray


class ImageLoadError(ValueError):
    """An input that is not a usable image; `str(error)` is one line: `<path>: <reason>`."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # picklable, so that it can cross process boundaries (e.g. DataLoader workers)
        return type(self), (self.path, self.reason)


def load_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file into an upright RGB `PIL.Image`; raise ImageLoadError on any bad file.

    `max_pixels` (None: no limit of ours) rejects images whose header announces more pixels, before
    any pixel is decoded, so a 100 kB "decompression bomb" cannot allocate gigabytes.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        with open(path, "rb") as file:
            return _decode(file, path, max_pixels)
    except FileNotFoundError as error:
        raise ImageLoadError(path, "no such file") from error
    except PermissionError as error:
        raise ImageLoadError(path, "permission denied") from error
    except OSError as error:  # reading the file itself failed (I/O error, too many links...)
        raise ImageLoadError(path, f"cannot read the file ({error.strerror or error})") from error


def decode_image(
    data: bytes | bytearray, name: str = "<bytes>", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The bytes of an image file (e.g. an upload) as an upright RGB image; `name` is used in errors."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def as_image(item: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Any supported input as an upright RGB image: a path, file bytes, a numpy array or a PIL image."""
    if isinstance(item, Image.Image):
        _check_size(item, "<PIL.Image>", max_pixels)
        return _convert(item, "<PIL.Image>")
    if isinstance(item, bytes | bytearray):
        return decode_image(item, max_pixels=max_pixels)
    if isinstance(item, np.ndarray):
        return from_array(item)
    if isinstance(item, str | Path):
        return load_image(item, max_pixels)
    raise TypeError(
        f"cannot read an image from {type(item).__name__}; pass a path, bytes, array or PIL image"
    )


def from_array(array: np.ndarray) -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as RGB.

    uint8 is taken as is, uint16 is scaled to 8 bits, bool is black/white, and floats are read as 0..1
    (the matplotlib / scikit-image convention) and clipped.
    """
    name = f"<array {array.dtype} {'x'.join(map(str, array.shape))}>"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or array.size == 0:
        raise ImageLoadError(name, "expected an array of shape (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype == np.uint16:
        array = _scale_16_bit(array)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = (np.clip(np.nan_to_num(array), 0.0, 1.0) * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageLoadError(name, "unsupported array type (use uint8, uint16, bool or float)")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and return an RGB copy: alpha composited on white, 16 bits scaled to 8."""
    image = _upright(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # P, L and RGB images with a transparent colour (tRNS) included
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in _16_BIT_MODES:
        # convert("L") would clip every value above 255 to white; scale the 16-bit range instead
        return Image.fromarray(_scale_16_bit(np.asarray(image))).convert("RGB")
    return image.convert("RGB")  # CMYK (Pillow handles Adobe's inverted CMYK JPEGs), YCbCr, L, 1, P, F


def _decode(file, name: str | Path, max_pixels: int | None) -> Image.Image:
    try:
        # Pillow warns about odd files (corrupt EXIF, over its global ~89 MP limit, ...) with no path in the
        # message; we either return a good image or raise one clear error, so the warnings are noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _open_first_frame(file, name, max_pixels)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageLoadError(name, f"not a readable image (not a valid {FORMAT_NAMES} file)") from error
    except Image.DecompressionBombError as error:
        # raised by Image.open itself, above Pillow's process-wide limit (2 x MAX_IMAGE_PIXELS, ~179 MP)
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
        raise ImageLoadError(
            name, f"too large: over Pillow's limit of {limit:.0f} megapixels (a possible decompression bomb)"
        ) from error
    except Exception as error:
        # Pillow reports corrupt data with many exception types (OSError, SyntaxError, struct.error,
        # IndexError, ...; fuzzing finds new ones each release), so anything raised while decoding is
        # a broken file. KeyboardInterrupt and SystemExit are not Exceptions and still stop the run.
        raise ImageLoadError(
            name, f"not a readable image (truncated or corrupt: {_describe(error)})"
        ) from error


def _open_first_frame(file, name: str | Path, max_pixels: int | None) -> Image.Image:
    with Image.open(file, formats=FORMATS) as image:
        _check_size(image, name, max_pixels)  # from the header, before any pixel is decoded
        image.seek(0)  # animated GIF/WebP/PNG and multi-page TIFF: the first frame
        image.load()
        return _convert(image, name)


def _convert(image: Image.Image, name: str | Path) -> Image.Image:
    try:
        return to_rgb(image)
    except Exception as error:  # an exotic mode Pillow cannot convert (e.g. LAB), or lazy decoding failing
        raise ImageLoadError(
            name, f"cannot convert {image.mode} pixels to RGB ({_describe(error)})"
        ) from error


def _check_size(image: Image.Image, name: str | Path, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(name, f"has no pixels ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            name,
            f"too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:g} megapixels (a possible decompression bomb; to allow it, raise "
            f"max_pixels={max_pixels})",
        )


def _upright(image: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": handled below or harmless
            return ImageOps.exif_transpose(image)
    except Exception:  # a mangled EXIF block is metadata: keep the pixels as they are stored
        return image


def _scale_16_bit(array: np.ndarray) -> np.ndarray:
    return (np.clip(array.astype(np.float32), 0, 65535) / 257).round().astype(np.uint8)  # 65535 -> 255


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
