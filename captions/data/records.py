"""The common record every dataset adapter produces."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError

SPLITS = ("train", "val", "test")
DROP_IMAGE_SKIPPED = "image skipped"  # the drop reason of the captions of a skipped image
_REQUIRED = object()


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


class Records(list):
    """The ``ImageRecord`` list a reader returns, with what ``prepare`` needs to account for every
    caption of the sources and to explain its outcome:

    * ``dropped``: how many captions it read but could attach to no image, by reason
      (``{"annotation names an image id not in 'images'": 3}``);
    * ``skipped``: images the reader itself refused (``[{"image": name, "reason": ...}]``, e.g. a
      second COCO image id with the same ``file_name``), their captions counted in ``dropped``;
    * ``hash_split``: whether any image's split came from ``hash_split`` (no split given).
    """

    def __init__(self, records: Iterable[ImageRecord] = (), dropped: dict[str, int] | None = None) -> None:
        super().__init__(records)
        self.dropped: Counter[str] = Counter(dropped or {})
        self.skipped: list[dict[str, str]] = []
        self.hash_split = False

    def skip(self, name: str, reason: str, captions: int) -> None:
        """Refuse image ``name`` for ``reason``; its ``captions`` count as dropped with it."""
        self.skipped.append({"image": name, "reason": reason})
        if captions:
            self.dropped[DROP_IMAGE_SKIPPED] += captions

    def extend_from(self, other: list[ImageRecord]) -> None:
        """Append ``other``'s records, its dropped counts and skipped images (a reader of several sources)."""
        self.extend(other)
        self.dropped.update(getattr(other, "dropped", {}))
        self.skipped.extend(getattr(other, "skipped", []))
        self.hash_split = self.hash_split or getattr(other, "hash_split", False)


def type_name(value: object) -> str:
    """How an error names the JSON type of ``value``: ``an object``, ``an array``, ``a number``, ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def entry_object(value: object, label: str, source: Path) -> dict:
    """``value`` when it is a JSON object; else ``CaptionsError`` naming ``source`` and the entry."""
    if not isinstance(value, dict):
        raise CaptionsError(f"{label} must be an object, got {type_name(value)}", source)
    return value


def entry_field(entry: dict, key: str, kinds: tuple[type, ...], label: str, source: Path,
                default: Any = _REQUIRED) -> Any:
    """``entry[key]`` checked to be an instance of ``kinds`` (``bool`` never counts as a number).

    A missing key gives ``default``, or, when there is none, ``CaptionsError`` naming ``source``,
    the entry (``label``, e.g. ``images[3]``) and the key; so does a value of another type.
    """
    if key not in entry:
        if default is _REQUIRED:
            raise CaptionsError(f"{label} lacks '{key}'", source)
        return default
    value = entry[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(dict.fromkeys(type_name(k()) for k in kinds))
        raise CaptionsError(f"{label} '{key}' must be {wanted}, got {type_name(value)}", source)
    return value


def merge_records(rows: list[tuple[str, Path, str, str]]) -> Records:
    """Group ``(name, path, split, caption)`` rows into records, keeping first-seen order.

    Rows of one image and one split make one record (its first row fixes the path). An image
    named in rows of two splits gives one record per split: ``prepare`` keeps the first split's
    and skips the others as "named again in split ..." (as for every reader), never merging them.
    """
    by_key: dict[tuple[str, str], ImageRecord] = {}
    for name, path, split, caption in rows:
        rec = by_key.get((name, split))
        if rec is None:
            rec = by_key[name, split] = ImageRecord(name=name, path=path, split=split)
        rec.captions.append(caption)
    return Records(by_key.values())
