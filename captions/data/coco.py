"""Adapter for official COCO ``captions_*.json`` files (read with pycocotools)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from captions.data.records import ImageRecord
from captions.errors import CaptionsError
from captions.fsutil import read_json


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


def read_coco(sources: list[Path], images: Path | None) -> list[ImageRecord]:
    """Read COCO caption files; each file's split comes from its name.

    Images are looked up under ``images`` (default: ``<json dir>/../``), directly or in the
    ``train2017``-style folder matching the file.
    """
    from pycocotools.coco import COCO

    records: list[ImageRecord] = []
    for src in sources:
        data = read_json(src)  # clear errors for missing / malformed files
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise CaptionsError("not a COCO captions file (needs 'images' and 'annotations')", src)
        split = split_of_coco_file(src)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco.createIndex()
        root = images if images is not None else src.parent.parent
        dirs = image_dir_candidates(root, src)
        for img_id in coco.getImgIds():
            info = coco.imgs[img_id]
            file_name = info["file_name"]
            path = next((d / file_name for d in dirs if (d / file_name).exists()), dirs[-1] / file_name)
            caps = [a.get("caption", "") for a in coco.imgToAnns.get(img_id, [])]
            records.append(ImageRecord(name=file_name, path=path, split=split, captions=caps))
    return records
