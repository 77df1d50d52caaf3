"""Adapter for Karpathy-style ``dataset_*.json`` files (COCO, Flickr8k/30k, UCM, ...)."""

from __future__ import annotations

from pathlib import Path

from captions.data.records import ImageRecord
from captions.errors import CaptionsError
from captions.fsutil import read_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_karpathy(sources: list[Path], images: Path | None) -> list[ImageRecord]:
    """Read Karpathy json files. Images are at ``<root>/<filepath>/<filename>`` where ``root`` is
    ``images`` or the json's folder. Splits are used as given, ``restval`` going to train."""
    records: list[ImageRecord] = []
    for src in sources:
        data = read_json(src)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise CaptionsError("not a Karpathy dataset json (needs an 'images' list)", src)
        root = images if images is not None else src.parent
        for i, img in enumerate(data["images"]):
            try:
                filename = img["filename"]
                split = KARPATHY_SPLITS[img["split"]]
                sentences = img["sentences"]
            except KeyError as e:
                raise CaptionsError(f"image entry {i} lacks {e} or has an unknown split", src) from None
            rel = Path(img.get("filepath", "")) / filename
            caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in sentences]
            records.append(ImageRecord(name=str(rel), path=root / rel, split=split, captions=caps))
    return records
