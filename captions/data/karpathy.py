"""Adapter for Karpathy-style ``dataset_*.json`` files (COCO, Flickr8k/30k, UCM, ...)."""

from __future__ import annotations

from pathlib import Path

from captions.data.records import ImageRecord, Records, entry_field, entry_object, type_name
from captions.errors import CaptionsError
from captions.fsutil import read_json

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def sentence_text(sentence: object, label: str, src: Path) -> str:
    """One entry of an image's ``sentences``: a plain string, or an object with ``raw`` (used when
    non-empty) or ``tokens`` (a list of strings, joined by spaces). ``CaptionsError`` otherwise."""
    if isinstance(sentence, str):
        return sentence
    entry = entry_object(sentence, label, src)
    raw = entry_field(entry, "raw", (str,), label, src, default=None)
    tokens = entry_field(entry, "tokens", (list,), label, src, default=None)
    if raw is None and tokens is None:
        raise CaptionsError(f"{label} has neither 'raw' nor 'tokens'", src)
    if raw:
        return raw
    if tokens is not None and not all(isinstance(t, str) for t in tokens):
        raise CaptionsError(f"{label} 'tokens' must be an array of strings", src)
    return " ".join(tokens or [])


def image_record(img: object, i: int, root: Path, src: Path) -> ImageRecord:
    """Entry ``i`` of the file's ``images`` -> its record; ``CaptionsError`` naming the entry and key."""
    label = f"images[{i}]"
    entry = entry_object(img, label, src)
    filename = entry_field(entry, "filename", (str,), label, src).strip()
    if not filename:
        raise CaptionsError(f"{label} 'filename' is empty", src)
    split = entry_field(entry, "split", (str,), label, src)
    if split not in KARPATHY_SPLITS:
        raise CaptionsError(f"{label} 'split' is {split!r} (expected one of {', '.join(KARPATHY_SPLITS)})", src)
    sentences = entry_field(entry, "sentences", (list,), label, src)
    rel = Path(entry_field(entry, "filepath", (str,), label, src, default="")) / filename
    caps = [sentence_text(s, f"{label} sentences[{j}]", src) for j, s in enumerate(sentences)]
    return ImageRecord(name=str(rel), path=root / rel, split=KARPATHY_SPLITS[split], captions=caps)


def read_karpathy(sources: list[Path], images: Path | None, encoding: str = "utf-8") -> Records:
    """Read Karpathy json files. Images are at ``<root>/<filepath>/<filename>`` where ``root`` is
    ``images`` or the json's folder. Splits are used as given, ``restval`` going to train.

    Sentences may be objects (``raw`` and/or ``tokens``) or plain strings; a UTF-8 byte-order mark
    is skipped. Raises ``CaptionsError`` naming the file, the entry and the key for a structural
    fault (an entry that is not an object, a missing or mistyped key, an unknown split).
    """
    records = Records()
    for src in sources:
        data = read_json(src, encoding)
        if not isinstance(data, dict):
            raise CaptionsError(f"not a Karpathy dataset json (an object with an 'images' array; got "
                                f"{type_name(data)})", src)
        if "images" not in data:
            raise CaptionsError("not a Karpathy dataset json (no 'images' array)", src)
        if not isinstance(data["images"], list):
            raise CaptionsError(f"'images' must be an array, got {type_name(data['images'])}", src)
        root = images if images is not None else src.parent
        records.extend(image_record(img, i, root, src) for i, img in enumerate(data["images"]))
    return records
