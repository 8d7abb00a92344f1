"""A corpus of malformed and unusual image files, generated on the fly (nothing binary in the repo).

`build_corpus(folder)` writes every case into `folder` and returns them; each case says what imcap must do
with it: give an RGB image (optionally checked by `check`), or raise ImageLoadError whose reason contains
`error`.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
NOT_READABLE = "not a readable image"
TOO_LARGE = "too large"


@dataclass
class Case:
    name: str
    data: bytes | None  # None: made by `make` (folders, links)
    error: str | None = None  # None: must load; else a substring of the ImageLoadError reason
    check: Callable[[Image.Image], None] | None = None
    make: Callable[[Path], None] | None = None


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def near(actual, expected, tolerance=12) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def pixel_is(xy, colour, tolerance=12) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert near(image.getpixel(xy), colour, tolerance), (image.getpixel(xy), colour)

    return check


def size_is(size) -> Callable[[Image.Image], None]:
    def check(image: Image.Image) -> None:
        assert image.size == size, image.size

    return check


def photo(size=(48, 32)) -> Image.Image:
    """A small picture with structure (a gradient and a red square) so that codecs have work to do."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    array = np.stack([x, y, 255 - x], axis=2)
    array[: height // 4, : width // 4] = RED  # a marker in the top-left corner
    return Image.fromarray(array)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that announces width x height but carries almost no data: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    packed = struct.pack(fmt, *values)
    return data[:offset] + packed + data[offset + len(packed) :]


def jpeg_with_size(width: int, height: int) -> bytes:
    data = encode(photo(), "JPEG")
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: length(2) precision(1) height(2) width(2)
    return patched(data, sof + 5, ">HH", height, width)


def with_exif_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, GREEN, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def with_alpha(mode: str) -> Image.Image:
    """Left half fully transparent (any colour underneath), right half opaque red or grey."""
    rgba = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (16, 16), (255, 0, 0, 255)), (16, 0))
    return rgba if mode == "RGBA" else rgba.convert(mode)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (32, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(1, (16, 0, 32, 16))
    image.info["transparency"] = 0
    return image


def sixteen_bit(values: list[int]) -> Image.Image:
    return Image.fromarray(np.array([values] * 4, dtype=np.uint16))


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (24, 24), colour) for colour in (RED, GREEN)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def upright_cases() -> list[Case]:
    """All eight EXIF orientations of a 48x32 photo with a red top-left marker."""
    cases = []
    for orientation in range(1, 9):
        size = (32, 48) if orientation >= 5 else (48, 32)
        cases.append(
            Case(
                f"exif_orientation_{orientation}.jpg",
                with_exif_orientation(photo(), "JPEG", orientation),
                check=size_is(size),
            )
        )
    # orientation 6 = stored rotated 90 degrees counter-clockwise: upright, the marker is top-right
    cases.append(
        Case("exif_rotated.png", with_exif_orientation(photo(), "PNG", 6), check=pixel_is((28, 2), RED))
    )
    cases.append(
        Case("exif_rotated.webp", with_exif_orientation(photo(), "WEBP", 6), check=size_is((32, 48)))
    )
    return cases


def readable_cases() -> list[Case]:
    jpeg = encode(photo(), "JPEG", quality=90)
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    return [
        Case("plain.jpg", jpeg, check=pixel_is((2, 2), RED, 40)),
        Case("progressive.jpg", encode(photo(), "JPEG", progressive=True)),
        Case("grey.jpg", encode(photo().convert("L"), "JPEG")),
        Case("UPPER_CASE.JPG", jpeg),
        Case("plain.png", encode(photo(), "PNG"), check=pixel_is((2, 2), RED, 0)),
        Case("grey.png", encode(photo().convert("L"), "PNG")),
        Case("bilevel.png", encode(photo().convert("1"), "PNG")),
        Case("palette.png", encode(photo().convert("P"), "PNG")),
        Case("png_named.jpg", encode(photo(), "PNG"), check=pixel_is((2, 2), RED, 0)),
        Case("lossy.webp", encode(photo(), "WEBP")),
        Case(
            "alpha_lossless.webp",
            encode(with_alpha("RGBA"), "WEBP", lossless=True),
            check=pixel_is((2, 2), WHITE),
        ),
        Case("plain.bmp", encode(photo(), "BMP"), check=pixel_is((2, 2), RED, 0)),
        Case("plain.tif", encode(photo(), "TIFF"), check=pixel_is((2, 2), RED, 0)),
        Case("lzw.tiff", encode(photo(), "TIFF", compression="tiff_lzw")),
        Case("multipage.tif", multipage_tiff(), check=pixel_is((5, 5), RED, 0)),
        Case(
            "float.tif",
            encode(Image.new("F", (16, 16), 128.0), "TIFF"),
            check=pixel_is((3, 3), (128,) * 3, 1),
        ),
        Case("plain.gif", encode(photo(), "GIF")),
        Case("rgba.png", encode(with_alpha("RGBA"), "PNG"), check=pixel_is((2, 2), WHITE, 0)),
        Case("la.png", encode(with_alpha("LA"), "PNG"), check=pixel_is((2, 2), WHITE, 0)),
        Case(
            "palette_transparency.png",
            encode(palette_with_transparency(), "PNG"),
            check=pixel_is((2, 2), WHITE, 0),
        ),
        Case(
            "palette_transparency.gif",
            encode(palette_with_transparency(), "GIF"),
            check=pixel_is((2, 2), WHITE, 0),
        ),
        Case("rgb_trns.png", encode(photo(), "PNG", transparency=RED), check=pixel_is((2, 2), WHITE, 0)),
        Case(
            "sixteen_bit.png", encode(sixteen_bit([0, 32896, 65535]), "PNG"), check=pixel_is((2, 0), WHITE, 0)
        ),
        Case(
            "sixteen_bit.tif",
            encode(sixteen_bit([0, 32896, 65535]), "TIFF"),
            check=pixel_is((1, 0), (128,) * 3, 0),
        ),
        # a dark 16-bit frame: 4112/65535 of full scale is 16/255, not the 255 that clipping would give
        Case(
            "sixteen_bit_dark.png",
            encode(sixteen_bit([4112] * 3), "PNG"),
            check=pixel_is((1, 1), (16,) * 3, 0),
        ),
        Case("cmyk.jpg", encode(cmyk, "JPEG", quality=95), check=pixel_is((8, 8), (0, 255, 255), 16)),
        Case("cmyk.tif", encode(cmyk, "TIFF"), check=pixel_is((8, 8), (0, 255, 255), 0)),
        Case("animated.gif", animated("GIF"), check=pixel_is((16, 16), RED, 8)),
        Case("animated.webp", animated("WEBP"), check=pixel_is((16, 16), RED, 24)),
        Case("animated.png", animated("PNG"), check=pixel_is((16, 16), RED, 0)),
        Case("one_pixel.png", encode(Image.new("RGB", (1, 1), BLUE), "PNG"), check=size_is((1, 1))),
        Case("thin_strip.png", encode(Image.new("L", (3000, 1), 90), "PNG"), check=size_is((3000, 1))),
        Case("garbage_exif.jpg", encode(photo(), "JPEG", exif=b"Exif\x00\x00II*\x00garbage-not-ifd")),
    ]


def truncated_cases() -> list[Case]:
    jpeg, png = encode(photo(), "JPEG"), encode(photo(), "PNG")
    cases = [Case(f"truncated_{cut}_bytes.jpg", jpeg[:cut], NOT_READABLE) for cut in (2, 20, 200)]
    cases += [
        Case("truncated_half.jpg", jpeg[: len(jpeg) // 2], NOT_READABLE),
        Case("truncated_no_end_marker.jpg", jpeg[:-2], NOT_READABLE),
        Case("png_signature_only.png", png[:8], NOT_READABLE),
        Case("truncated_in_header.png", png[:20], NOT_READABLE),
        Case("truncated_half.png", png[: len(png) // 2], NOT_READABLE),
    ]
    for fmt, suffix in (("GIF", "gif"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tif")):
        data = encode(photo(), fmt)
        cases.append(Case(f"truncated_half.{suffix}", data[: len(data) // 2], NOT_READABLE))
    return cases


def corrupt_cases() -> list[Case]:
    png = encode(photo(), "PNG")
    idat = png.index(b"IDAT") + 8
    rng = random.Random(0)
    return [
        Case("empty.jpg", b"", "empty file"),
        Case("empty.png", b"", "empty file"),
        Case("text_renamed.jpg", b"these are holiday notes, not a photo\n" * 20, NOT_READABLE),
        Case("html_renamed.png", b"<!doctype html><html><body>404 Not Found</body></html>", NOT_READABLE),
        Case(
            "svg_renamed.png",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
            NOT_READABLE,
        ),
        Case("random_bytes.jpg", bytes(rng.randrange(256) for _ in range(4096)), NOT_READABLE),
        Case("zip_renamed.png", b"PK\x03\x04" + bytes(200), NOT_READABLE),
        Case("ppm_renamed.jpg", encode(photo(), "PPM"), NOT_READABLE),  # a real image, not a format we take
        Case("jpeg_markers_only.jpg", b"\xff\xd8\xff\xd9", NOT_READABLE),
        Case("png_bad_header_crc.png", png[:29] + b"\x00\x00\x00\x00" + png[33:], NOT_READABLE),
        Case("png_corrupt_data.png", png[:idat] + b"\xff" * 40 + png[idat + 40 :], NOT_READABLE),
        Case("png_zero_size.png", png_header_only(0, 0), NOT_READABLE),
    ]


def oversized_cases() -> list[Case]:
    gif, bmp = encode(photo(), "GIF"), encode(photo(), "BMP")
    return [
        Case("bomb_81_megapixels.png", png_header_only(9000, 9000), TOO_LARGE),  # under Pillow's own limit
        Case("bomb_100_megapixels.png", png_header_only(10_000, 10_000), TOO_LARGE),  # Pillow only warns
        Case("bomb_10_gigapixels.png", png_header_only(100_000, 100_000), TOO_LARGE),  # Pillow refuses
        Case("bomb.gif", patched(gif, 6, "<HH", 65535, 65535), TOO_LARGE),
        Case("bomb.bmp", patched(bmp, 18, "<ii", 60_000, 60_000), TOO_LARGE),
        Case("bomb.jpg", jpeg_with_size(60_000, 60_000), TOO_LARGE),
        Case("huge_but_thin.jpg", jpeg_with_size(65_000, 1_000), TOO_LARGE),
    ]


def odd_path_cases() -> list[Case]:
    return [
        Case("folder.jpg", None, "is a folder", make=lambda path: path.mkdir()),
        Case(
            "dangling_link.jpg", None, "no such file", make=lambda path: path.symlink_to(path.parent / "gone")
        ),
    ]


def all_cases() -> list[Case]:
    return (
        upright_cases()
        + readable_cases()
        + truncated_cases()
        + corrupt_cases()
        + oversized_cases()
        + odd_path_cases()
    )


CASES = all_cases()


def build_corpus(folder: Path) -> list[Case]:
    folder.mkdir(parents=True, exist_ok=True)
    cases = CASES
    for case in cases:
        if case.make:
            case.make(folder / case.name)
        else:
            (folder / case.name).write_bytes(case.data)
    return cases
