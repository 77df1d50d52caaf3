"""Adapter for Flickr8k: the official ``Flickr8k.token.txt`` + split lists, or Kaggle's ``captions.txt``."""

from __future__ import annotations

import logging
from pathlib import Path

from captions.data.csv_table import parse_csv_table
from captions.data.records import ImageRecord, Records, merge_records
from captions.errors import CaptionsError
from captions.fsutil import read_text

log = logging.getLogger("captions")

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


def read_split_lists(folder: Path, given: list[Path], encoding: str = "utf-8") -> dict[str, list[str]] | None:
    """Map image name -> the splits whose official list file names it (given explicitly or found
    in ``folder``), in the order train, val, test; usually one.

    Returns None when no list file is found at all. Lists are read as ``encoding`` (a UTF-8
    byte-order mark skipped); blank lines are skipped.
    """
    files = {split: next((p for p in given if p.name == fname), folder / fname) for split, fname in SPLIT_LISTS.items()}
    if not any(p.exists() for p in files.values()):
        return None
    splits_of: dict[str, list[str]] = {}
    for split, path in files.items():
        if not path.exists():
            raise CaptionsError(f"split list missing (the other Flickr8k lists are present: {folder})", path)
        names = (line.strip() for line in read_text(path, encoding).split("\n"))  # not splitlines(): U+0085
        for name in dict.fromkeys(n for n in names if n):  # and U+2028 are text; a repeat in one list is harmless
            splits_of.setdefault(name, []).append(split)
    return splits_of


def assign_splits(records: Records, splits_of: dict[str, list[str]]) -> Records:
    """Give each record the split of the first list naming it (``""`` when none does). An image
    named in further lists gets an empty record for each, after it: ``prepare`` skips and reports
    those ("named again in split 'val' (first in 'train')") and keeps the first, as for every reader."""
    out = Records(dropped=records.dropped)  # the lists decide: no split is a hash split any more
    out.skipped = records.skipped
    seen: set[str] = set()
    for r in records:
        first, *again = splits_of.get(r.name) or [""]
        r.split = first
        out.append(r)
        if r.name not in seen:
            seen.add(r.name)
            out.extend(ImageRecord(r.name, r.path, split) for split in again)
    return out


def parse_token_file(text: str, path: Path) -> list[tuple[str, str]]:
    """Parse ``NAME.jpg#N<TAB>caption`` lines into (image name, caption) pairs.

    Blank lines are skipped, and so is a first line that is a header (``image_id<TAB>captions``:
    no ``#N`` in its first field). Raises ``CaptionsError`` naming the file and line for any other
    line of another shape.
    """
    pairs = []
    seen_any = False
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+0085 and U+2028 are text
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name, hashed, number = key.strip().rpartition("#")
        if not sep or not hashed or not name.strip() or not number.strip().isdigit():
            if not seen_any and sep and "#" not in key:
                log.info("%s: line %d is a header (%r); skipped", path, lineno, line.strip()[:60])
                seen_any = True
                continue
            raise CaptionsError(f"line {lineno} is not 'IMAGE#N<TAB>caption' (got {line.strip()[:60]!r})", path)
        seen_any = True
        pairs.append((name.strip(), caption.rstrip("\r")))
    return pairs


def is_token_file(text: str) -> bool:
    """True for the official tab-separated token file (its first non-blank line has a tab, also
    when that line is a header), False for a CSV (Kaggle ``captions.txt``)."""
    first = next((line for line in text.split("\n") if line.strip()), "")
    return "\t" in first


def read_flickr8k(
    sources: list[Path], images: Path | None, val_fraction: float = 0.05, test_fraction: float = 0.05,
    encoding: str = "utf-8",
) -> Records:
    """Read Flickr8k captions. The first source is the token file or Kaggle ``captions.txt``; the
    official split lists are taken from further sources or found beside it. Images not in any
    list get split ``""``, and an image in two lists a second, empty record (``assign_splits``):
    ``prepare`` reports and skips both kinds. Every text is read as
    ``encoding`` with a UTF-8 byte-order mark skipped; a byte not valid in it, or a malformed
    line, is a ``CaptionsError`` naming the file and line."""
    main, extra = sources[0], sources[1:]
    image_dir = images if images is not None else default_image_dir(main)
    text = read_text(main, encoding)
    if is_token_file(text):
        pairs = parse_token_file(text, main)
        splits_of = read_split_lists(main.parent, extra, encoding)
        if splits_of is None:
            raise CaptionsError(
                "no Flickr_8k.{train,dev,test}Images.txt split lists beside it; pass them as extra SOURCEs", main
            )
        return assign_splits(merge_records([(n, image_dir / n, "", c) for n, c in pairs]), splits_of)
    # Kaggle layout: CSV with image,caption and no split column -> hash split (or official lists if present).
    records = parse_csv_table(text, main, image_dir, val_fraction, test_fraction)
    splits_of = read_split_lists(main.parent, extra, encoding)
    return records if splits_of is None else assign_splits(records, splits_of)
