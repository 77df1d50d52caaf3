"""Adapter for Flickr8k: the official ``Flickr8k.token.txt`` + split lists, or Kaggle's ``captions.txt``."""

from __future__ import annotations

from pathlib import Path

from captions.data.csv_table import read_csv_table
from captions.data.records import ImageRecord, merge_records
from captions.errors import CaptionsError

SPLIT_LISTS = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_DIR_NAMES = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images")


def default_image_dir(source: Path) -> Path:
    """The first of the usual Flickr8k image folders found beside ``source`` or one level up."""
    for base in (source.parent, source.parent.parent):
        for name in IMAGE_DIR_NAMES:
            if (base / name).is_dir():
                return base / name
    return source.parent / IMAGE_DIR_NAMES[0]


def read_split_lists(folder: Path, given: list[Path]) -> dict[str, str] | None:
    """Map image name -> split from the official list files (given explicitly or found in ``folder``).

    Returns None when no list file is found at all.
    """
    files = {split: next((p for p in given if p.name == fname), folder / fname) for split, fname in SPLIT_LISTS.items()}
    if not any(p.exists() for p in files.values()):
        return None
    split_of: dict[str, str] = {}
    for split, path in files.items():
        if not path.exists():
            raise CaptionsError(f"split list missing (the other Flickr8k lists are present: {folder})", path)
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                split_of[line.strip()] = split
    return split_of


def read_token_file(path: Path) -> list[tuple[str, str]]:
    """Parse ``NAME.jpg#N<TAB>caption`` lines into (image name, caption) pairs."""
    pairs = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaptionsError("file not found", path) from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise CaptionsError(f"line {lineno} is not 'IMAGE#N<TAB>caption'", path)
        pairs.append((key.rsplit("#", 1)[0], caption))
    return pairs


def is_token_file(path: Path) -> bool:
    """True for the official tab-separated token file, False for a CSV (Kaggle ``captions.txt``)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except FileNotFoundError:
        raise CaptionsError("file not found", path) from None
    return "\t" in first and "#" in first.split("\t", 1)[0]


def read_flickr8k(
    sources: list[Path], images: Path | None, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> list[ImageRecord]:
    """Read Flickr8k captions. The first source is the token file or Kaggle ``captions.txt``; the
    official split lists are taken from further sources or found beside it. Images not in any
    list get split ``""`` (``prepare`` reports them as skipped)."""
    main, extra = sources[0], sources[1:]
    image_dir = images if images is not None else default_image_dir(main)
    if is_token_file(main):
        pairs = read_token_file(main)
        split_of = read_split_lists(main.parent, extra)
        if split_of is None:
            raise CaptionsError(
                "no Flickr_8k.{train,dev,test}Images.txt split lists beside it; pass them as extra SOURCEs", main
            )
        rows = [(n, image_dir / n, split_of.get(n, ""), c) for n, c in pairs]
        return merge_records(rows)
    # Kaggle layout: CSV with image,caption and no split column -> hash split (or official lists if present).
    records = read_csv_table(main, image_dir, val_fraction, test_fraction)
    split_of = read_split_lists(main.parent, extra)
    if split_of is not None:
        for r in records:
            r.split = split_of.get(r.name, "")
    return records
