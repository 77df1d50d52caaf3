"""Attention-map figures with PIL and numpy only (no plotting library).

``attention_grid`` lays out the photo followed by one tile per generated word: the photo with the
word's attention weights upsampled to the photo's size, colour-mapped and blended in, the word as
the tile's title, and the whole caption as a header.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captions.fsutil import atomic_path

TILE = 192  # tile side in pixels
TITLE_HEIGHT = 22  # strip above each tile holding its word
HEADER_HEIGHT = 26  # strip above the grid holding the caption
COLUMNS = 4
BLEND = (0.2, 0.65)  # heat-map opacity where the attention is lowest / highest: the photo stays visible


def jet(x: np.ndarray) -> np.ndarray:
    """Jet-like colour map: values in [0, 1] (any shape) -> uint8 RGB (..., 3), blue -> red."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def upsample(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Attention weights (h, w) -> (size[1], size[0]) float32 in [0, 1], bilinearly upsampled after
    min-max scaling (a uniform map becomes all zeros)."""
    a = np.asarray(weights, dtype=np.float32)
    span = float(a.max() - a.min())
    a = (a - a.min()) / span if span > 1e-12 else np.zeros_like(a)
    up = Image.fromarray(a, mode="F").resize(size, Image.BILINEAR)
    return np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)


def heat_overlay(photo: Image.Image, weights: np.ndarray, blend: tuple[float, float] = BLEND) -> Image.Image:
    """The RGB ``photo`` with the (h, w) attention ``weights`` drawn over it as a heat map, more
    opaque where the attention is higher."""
    heat, alpha = _heat_and_alpha(weights, photo.size, blend)
    base = np.asarray(photo.convert("RGB"), dtype=np.float32)
    return Image.fromarray(((1.0 - alpha) * base + alpha * heat + 0.5).astype(np.uint8), "RGB")


def heat_layer(weights: np.ndarray, size: tuple[int, int], blend: tuple[float, float] = BLEND) -> Image.Image:
    """The heat map of ``heat_overlay`` alone: an RGBA image of ``size`` (width, height) whose alpha
    is the blend opacity, to lay over the photo (web pages stack it on the image they show)."""
    heat, alpha = _heat_and_alpha(weights, size, blend)
    rgba = np.concatenate([heat, alpha * 255.0], axis=-1) + 0.5
    return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def _heat_and_alpha(weights: np.ndarray, size: tuple[int, int],
                    blend: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) weights -> jet colours (H, W, 3) and opacity (H, W, 1), float32, at ``size``."""
    a = upsample(weights, size)
    return jet(a).astype(np.float32), (blend[0] + (blend[1] - blend[0]) * a)[..., None]


# system fonts with wide coverage (Vietnamese, Greek, Cyrillic...) before Pillow's built-in one,
# which only has Latin-1 and draws other letters as boxes
FONT_CANDIDATES = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arial.ttf")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid_size(n_words: int, tile: int = TILE, columns: int = COLUMNS) -> tuple[int, int]:
    """Pixel (width, height) of the grid for ``n_words`` words (the photo takes the first tile)."""
    n_tiles = n_words + 1
    cols = min(columns, n_tiles)
    rows = math.ceil(n_tiles / cols)
    return cols * tile, HEADER_HEIGHT + rows * (TITLE_HEIGHT + tile)


def tile_box(index: int, tile: int = TILE, columns: int = COLUMNS, n_words: int | None = None
             ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of image tile ``index`` (0: the photo, i: word i) in the grid."""
    cols = columns if n_words is None else min(columns, n_words + 1)
    r, c = divmod(index, cols)
    left, top = c * tile, HEADER_HEIGHT + r * (TITLE_HEIGHT + tile) + TITLE_HEIGHT
    return left, top, left + tile, top + tile


def attention_grid(photo: Image.Image, words: Sequence[str], maps: np.ndarray, caption: str | None = None,
                   tile: int = TILE, columns: int = COLUMNS) -> Image.Image:
    """Grid figure: the photo, then one heat-map tile per word titled with the word.

    ``photo``: RGB image (shown at ``tile`` x ``tile``; pass the crop the backbone saw);
    ``maps``: (len(words), h, w) attention weights, row-major over the feature grid.
    Size: ``grid_size(len(words), tile, columns)``.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] != len(words):
        raise ValueError(f"maps must be (len(words), h, w) = ({len(words)}, h, w), got {maps.shape}")
    width, height = grid_size(len(words), tile, columns)
    cols = min(columns, len(words) + 1)
    fig = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    title_font, header_font = _font(15), _font(16)
    shown = photo.convert("RGB").resize((tile, tile), Image.BICUBIC)
    text = caption if caption is not None else " ".join(words)
    draw.text((6, 4), _fit(draw, text, header_font, width - 12), fill=(0, 0, 0), font=header_font)
    for i, (title, img) in enumerate([("image", shown), *((w, None) for w in words)]):
        left, top, _, _ = tile_box(i, tile, cols)
        tile_img = shown if img is not None else heat_overlay(shown, maps[i - 1])
        fig.paste(tile_img, (left, top))
        label = _fit(draw, title, title_font, tile - 8)
        draw.text((left + (tile - draw.textlength(label, font=title_font)) / 2, top - TITLE_HEIGHT + 3), label,
                  fill=(0, 0, 0), font=title_font)
    return fig


def save_attention_grid(path: str | os.PathLike, photo: Image.Image, words: Sequence[str], maps: np.ndarray,
                        caption: str | None = None) -> Path:
    """Write ``attention_grid(...)`` as a PNG atomically; returns the path."""
    path = Path(path)
    fig = attention_grid(photo, words, maps, caption)
    with atomic_path(path) as tmp:
        fig.save(tmp, format="PNG")
    return path
