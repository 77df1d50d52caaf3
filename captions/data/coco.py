"""Adapter for COCO-style ``captions_*.json`` files: the official ones and those other tools or
people write (string ids, no annotation ``id``, extra lists such as ``categories``)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from captions.data.records import ImageRecord, Records, entry_field, entry_object, type_name
from captions.errors import CaptionsError
from captions.fsutil import read_json

log = logging.getLogger("captions")

UNKNOWN_IMAGE = "annotation names an image id not in 'images'"


def split_of_coco_file(path: Path) -> str:
    """Map ``captions_train2017.json`` -> train, ``captions_val2014.json`` -> val, ``*test*`` -> test."""
    stem = path.stem.lower()
    for split in ("train", "val", "test"):
        if split in stem:
            return split
    raise CaptionsError("cannot tell the split from the file name (expected train, val or test in it)", path)


def image_dir_candidates(images: Path, annotation: Path) -> list[Path]:
    """Folders where a COCO file's images may live: ``images/`` itself and ``images/<tag>`` for
    the annotation's tag (``captions_train2017.json`` -> ``train2017``)."""
    m = re.search(r"(train|val|test)(\d{4})?", annotation.stem)
    dirs = [images]
    if m:
        dirs.append(images / m.group(0))
    return dirs


def id_key(value: int | str) -> str:
    """An image id as the key that matches it across ``images`` and ``annotations``: tools that
    write ids as strings (``"42"``) and those that write numbers (``42``) name the same image."""
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _list_of(data: dict, key: str, src: Path) -> list:
    if key not in data:
        raise CaptionsError(f"not a COCO captions file (no '{key}' list)", src)
    if not isinstance(data[key], list):
        raise CaptionsError(f"'{key}' must be an array, got {type_name(data[key])}", src)
    return data[key]


def _images(data: dict, src: Path) -> dict[str, tuple[str, list[str], int]]:
    """id key -> (file_name, its captions list (filled later), index in ``images``) of the file's
    ``images``."""
    images: dict[str, tuple[str, list[str], int]] = {}
    for i, raw in enumerate(_list_of(data, "images", src)):
        label = f"images[{i}]"
        entry = entry_object(raw, label, src)
        key = id_key(entry_field(entry, "id", (int, str), label, src))
        file_name = str(entry_field(entry, "file_name", (str,), label, src)).strip()
        if not file_name:
            raise CaptionsError(f"{label} 'file_name' is empty", src)
        if key in images:
            raise CaptionsError(f"{label} repeats the id {entry['id']!r} of images[{images[key][2]}]", src)
        images[key] = (file_name, [], i)
    return images


def _attach_captions(data: dict, src: Path, by_id: dict[str, tuple[str, list[str], int]]) -> list[object]:
    """Append each annotation's caption to its image in ``by_id``; returns the image ids of the
    annotations that name no image of ``images``."""
    unknown: list[object] = []
    for j, raw in enumerate(_list_of(data, "annotations", src)):
        label = f"annotations[{j}]"
        ann = entry_object(raw, label, src)
        image_id = entry_field(ann, "image_id", (int, str), label, src)
        caption = entry_field(ann, "caption", (str,), label, src)
        target = by_id.get(id_key(image_id))
        if target is None:
            unknown.append(image_id)
        else:
            target[1].append(caption)
    return unknown


def read_coco_file(src: Path, images: Path | None, encoding: str = "utf-8") -> Records:
    """One COCO captions file -> its records (split from the file name).

    Images are looked up under ``images`` (default: ``<json dir>/../``), directly or in the
    ``train2017``-style folder matching the file. Annotations naming an image id that is not in
    ``images`` are dropped, counted (``Records.dropped``) and reported. A later image id with the
    ``file_name`` of an earlier one is skipped (``Records.skipped``: which captions belong to the
    file cannot be told), its captions counted as dropped; the first keeps its own. Raises
    ``CaptionsError`` naming the file, the entry and the key for any structural fault (a missing
    or mistyped ``id``, ``file_name``, ``image_id`` or ``caption``; ``images``/``annotations`` not
    arrays; an id repeated).
    """
    data = read_json(src, encoding)
    if not isinstance(data, dict):
        raise CaptionsError(f"not a COCO captions file (an object with 'images' and 'annotations'; got "
                            f"{type_name(data)})", src)
    split = split_of_coco_file(src)
    by_id = _images(data, src)
    unknown = _attach_captions(data, src, by_id)
    if unknown:
        log.warning("%s: %d annotation(s) name image ids not in 'images' (e.g. %r); dropped", src, len(unknown),
                    unknown[0])
    dirs = image_dir_candidates(images if images is not None else src.parent.parent, src)
    records = Records(dropped={UNKNOWN_IMAGE: len(unknown)} if unknown else None)
    first_of: dict[str, tuple[str, int]] = {}  # file_name -> (id, index in images) of the first image naming it
    for key, (file_name, caps, i) in by_id.items():
        if file_name in first_of:
            other, j = first_of[file_name]
            records.skip(file_name, f"image id {key} (images[{i}]) has the file_name of image id {other} "
                                    f"(images[{j}]); its {len(caps)} caption(s) dropped", len(caps))
            continue
        first_of[file_name] = key, i
        path = next((d / file_name for d in dirs if (d / file_name).exists()), dirs[-1] / file_name)
        records.append(ImageRecord(name=file_name, path=path, split=split, captions=caps))
    return records


def read_coco(sources: list[Path], images: Path | None, encoding: str = "utf-8") -> Records:
    """Read COCO caption files (``read_coco_file`` each); returns their records in order."""
    records = Records()
    for src in sources:
        records.extend_from(read_coco_file(src, images, encoding))
    return records
