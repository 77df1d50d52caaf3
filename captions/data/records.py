"""The common record every dataset adapter produces."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError

SPLITS = ("train", "val", "test")
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
    """The ``ImageRecord`` list a reader returns, with ``dropped``: how many captions it read but
    could attach to no image, by reason (``{"annotation names an image id not in 'images'": 3}``), so that
    ``prepare`` can account for every caption of the sources."""

    def __init__(self, records: Iterable[ImageRecord] = (), dropped: dict[str, int] | None = None) -> None:
        super().__init__(records)
        self.dropped: Counter[str] = Counter(dropped or {})

    def extend_from(self, other: list[ImageRecord]) -> None:
        """Append ``other``'s records and add its dropped counts (a reader of several sources)."""
        self.extend(other)
        self.dropped.update(getattr(other, "dropped", {}))


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

    The first row of an image fixes its path and split.
    """
    by_name: dict[str, ImageRecord] = {}
    for name, path, split, caption in rows:
        rec = by_name.get(name)
        if rec is None:
            rec = by_name[name] = ImageRecord(name=name, path=path, split=split)
        rec.captions.append(caption)
    return Records(by_name.values())
