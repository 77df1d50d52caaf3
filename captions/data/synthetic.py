"""The embedded demo dataset: coloured shapes whose captions can only be produced by looking.

Each image holds one shape of a given kind, colour, size and position on a noisy background;
each image gets several differently worded captions that all name those four attributes. It is
written as official COCO caption files plus JPEGs, so ``prepare`` reads it with the same parser
as real COCO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captions.fsutil import atomic_path, write_json_atomic

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
}
SIZES = {"small": 0.16, "big": 0.34}  # radius as a fraction of the image side
# 3 x 3 grid of positions: (name, column, row)
POSITIONS = (
    ("top left", 0, 0), ("top", 1, 0), ("top right", 2, 0),
    ("left", 0, 1), ("center", 1, 1), ("right", 2, 1),
    ("bottom left", 0, 2), ("bottom", 1, 2), ("bottom right", 2, 2),
)  # fmt: skip
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "big": ("big", "large", "huge")}
TEMPLATES = (
    "a {size} {colour} {shape} in the {where}",
    "there is a {size} {colour} {shape} at the {where}",
    "a {colour} {shape} , {size} , placed at the {where}",
    "the picture shows a {size} {colour} {shape} in the {where}",
    "{size} {colour} {shape} at the {where} of the image",
)


def where_phrase(position: str) -> str:
    """``top left`` -> ``top left corner``, ``center`` -> ``center``, ``left`` -> ``left side``."""
    if " " in position:
        return f"{position} corner"
    return position if position == "center" else f"{position} side"


def draw_shape(size_px: int, shape: str, colour: tuple[int, int, int], radius: float,
               cx: float, cy: float, rng: np.random.Generator) -> Image.Image:
    """Render one shape on a light noisy background; returns an RGB ``size_px`` square image."""
    base = rng.integers(170, 235)
    noise = rng.normal(0, 12, size=(size_px, size_px, 3))
    bg = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    jitter = np.clip(np.array(colour) + rng.integers(-25, 26, 3), 0, 255)
    fill = tuple(int(v) for v in jitter)
    if shape == "circle":
        d.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        r = radius * 0.9
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        pts = [(cx + radius * math.cos(a), cy + radius * math.sin(a))
               for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill)
    return img


def make_example(rng: np.random.Generator, size_px: int) -> tuple[Image.Image, list[str]]:
    """Draw one random image and its five captions (one per template, synonyms sampled)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position, col, row = POSITIONS[rng.integers(len(POSITIONS))]
    radius = SIZES[size] * size_px * 0.8 * rng.uniform(0.85, 1.1)
    cell = size_px / 3
    cx = (col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
    img = draw_shape(size_px, shape, COLOURS[colour], radius, cx, cy, rng)
    caps = []
    for template in TEMPLATES:
        syn = SIZE_SYNONYMS[size][rng.integers(len(SIZE_SYNONYMS[size]))]
        caps.append(template.format(size=syn, colour=colour, shape=shape, where=where_phrase(position)))
    return img, caps


def generate_synthetic(out_dir: str | Path, n_train: int = 1200, n_val: int = 150, n_test: int = 150,
                       seed: int = 0, size_px: int = 128) -> list[Path]:
    """Write the synthetic set as COCO files; returns the ``captions_<split>.json`` paths.

    Layout: ``out_dir/<split>/<id>.jpg`` and ``out_dir/annotations/captions_<split>.json``.
    The same arguments always produce byte-identical files; an existing complete set is kept.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    paths, next_id, next_ann = [], 1, 1
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        ann_path = out_dir / "annotations" / f"captions_{split}.json"
        paths.append(ann_path)
        images, anns = [], []
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            img, caps = make_example(rng, size_px)
            file_name = f"{next_id:08d}.jpg"
            target = out_dir / split / file_name
            if not target.exists():
                with atomic_path(target) as tmp:
                    img.save(tmp, format="JPEG", quality=92)
            images.append({"id": next_id, "file_name": file_name, "width": size_px, "height": size_px})
            for c in caps:
                anns.append({"id": next_ann, "image_id": next_id, "caption": c})
                next_ann += 1
            next_id += 1
        doc = {"info": {"description": f"captions synthetic shapes, seed {seed}"}, "licenses": [],
               "images": images, "annotations": anns}
        if not ann_path.exists() or json.loads(ann_path.read_text()) != doc:
            write_json_atomic(ann_path, doc)
    return paths
