"""The figure of `imcap explain`, Show, Attend and Tell style: the photo, then one panel per word, the photo
lit where the model looked when it wrote that word and dimmed elsewhere, the word under it.

matplotlib's object API (no pyplot), so there is no global state and the server's threads may draw at once.
Each panel's map is scaled to its own peak, as in the paper's figures; the shares themselves are in the
JSON, and the share that went to the encoder's non-spatial tokens is written under each word.
"""

from __future__ import annotations

import importlib.util
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imcap.explain import ExplainError, Explanation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PANEL_PX = 200  # the photo's longer side in every panel
COLUMNS = 6  # panels per row: a 15-word caption takes 3 rows
DIMMED = 0.2  # brightness where the model did not look (1 where it looked most)
_DPI = 100
_NO_MATPLOTLIB = "drawing the figure needs matplotlib: pip install matplotlib (or 'imcap[serve]')"
_GAP, _LABEL, _TITLE, _MARGIN = 0.12, 0.5, 0.5, 0.15  # inches: between panels, under them, above, around


def render(explanation: Explanation, image: Image.Image, columns: int = COLUMNS) -> Image.Image:
    """The figure as an RGB picture."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (figure() checked matplotlib is there)

    canvas = FigureCanvasAgg(figure(explanation, image, columns))
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def figure(explanation: Explanation, image: Image.Image, columns: int = COLUMNS) -> Figure:
    """The photo and one panel per word, `columns` panels to a row (a matplotlib Figure)."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError:
        raise ExplainError(_NO_MATPLOTLIB) from None
    photo = _small(image)
    panels = [(photo, "(photo)", "")] + [
        (lit(photo, w.grid), w.word, f"other tokens {w.other_share:.0%}") for w in explanation.words
    ]
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    panel_w, panel_h = photo.shape[1] / _DPI, photo.shape[0] / _DPI
    width = 2 * _MARGIN + columns * panel_w + (columns - 1) * _GAP
    height = _TITLE + rows * (panel_h + _LABEL) + _MARGIN
    fig = Figure(figsize=(width, height), dpi=_DPI, facecolor="white")
    title = textwrap.fill(explanation.caption, max(20, int(width * 9)))
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=13)
    for index, (picture, word, note) in enumerate(panels):
        row, column = divmod(index, columns)
        left = _MARGIN + column * (panel_w + _GAP)
        bottom = height - _TITLE - row * (panel_h + _LABEL) - panel_h
        ax = fig.add_axes((left / width, bottom / height, panel_w / width, panel_h / height))
        ax.imshow(picture)
        ax.axis("off")
        ax.text(0.5, -0.02, word, transform=ax.transAxes, ha="center", va="top", fontsize=13, weight="bold")
        if note:
            ax.text(0.5, -0.17, note, transform=ax.transAxes, ha="center", va="top", fontsize=8, color="0.35")
    return fig


def save_figure(
    explanation: Explanation, image: Image.Image, path: str | Path, columns: int = COLUMNS
) -> None:
    """Write the figure as PNG (256 colours, dithered: a third of the size, and the panels read the
    same), JPEG or WebP, by the file's extension."""
    check_figure_path(path)
    picture = render(explanation, image, columns)
    if Path(path).suffix.lower() == ".png":
        picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    else:
        picture.save(path, quality=90)


def check_figure_path(path: str | Path) -> None:
    """Raise ExplainError, before any model work, if the figure could not be written there."""
    if Path(path).suffix.lower() not in FIGURE_SUFFIXES:
        raise ExplainError(f"the figure is written as {', '.join(FIGURE_SUFFIXES)}; got {Path(path).name!r}")
    if importlib.util.find_spec("matplotlib") is None:
        raise ExplainError(_NO_MATPLOTLIB)


def lit(photo: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 photo lit by a (rows, cols) attention grid, upsampled smoothly to the photo's size.

    The model saw the whole photo resized to a square, so the grid stretches over the photo as it is.
    """
    height, width = photo.shape[:2]
    heat = Image.fromarray(grid.astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC)
    heat = np.clip(np.asarray(heat), 0, None)
    heat = heat / heat.max() if heat.max() > 0 else heat
    light = DIMMED + (1 - DIMMED) * heat
    return (photo * light[..., None]).round().astype(np.uint8)


def _small(image: Image.Image) -> np.ndarray:
    picture = image.convert("RGB")
    picture.thumbnail((PANEL_PX, PANEL_PX), Image.Resampling.LANCZOS)
    return np.asarray(picture)
