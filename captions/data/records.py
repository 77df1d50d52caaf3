"""The common record every dataset adapter produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image and its raw (untokenized) reference captions.

    ``name`` is unique within a dataset (the file name, or a relative path); ``path`` is where the
    image is expected on disk (it may not exist: ``prepare`` reports and skips those); ``split`` is
    one of ``SPLITS``.
    """

    name: str
    path: Path
    split: str
    captions: list[str] = field(default_factory=list)


def merge_records(rows: list[tuple[str, Path, str, str]]) -> list[ImageRecord]:
    """Group ``(name, path, split, caption)`` rows into records, keeping first-seen order.

    The first row of an image fixes its path and split.
    """
    by_name: dict[str, ImageRecord] = {}
    for name, path, split, caption in rows:
        rec = by_name.get(name)
        if rec is None:
            rec = by_name[name] = ImageRecord(name=name, path=path, split=split)
        rec.captions.append(caption)
    return list(by_name.values())
