"""Images in: open a file as an upright RGB picture, whatever its mode."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white, as a browser shows them


class ImageLoadError(ValueError):
    """A file that is not a readable image; the message names the path and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and return an RGB image (alpha composited on white)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip everything above 255
        return image.point(lambda v: v / 256).convert("L").convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Read an image file into an upright RGB `PIL.Image`; raise ImageLoadError on any bad file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError as error:
        raise ImageLoadError(f"{path}: no such file") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: not a readable image ({error})") from error
