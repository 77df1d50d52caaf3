"""Adapter for plain CSV tables: ``image,caption[,split]``."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from captions.data.records import Records, merge_records
from captions.data.splits import hash_split
from captions.errors import CaptionsError
from captions.fsutil import read_text

log = logging.getLogger("captions")

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val", "test": "test"}
ACCEPTED_SPLITS = ", ".join(k if k == v else f"{k} (= {v})" for k, v in SPLIT_ALIASES.items())
NO_IMAGE_NAME = "row without an image name"


def csv_rows(text: str, path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Parse CSV ``text`` (from ``path``) into its lowercased header and (line number, fields) rows.

    Blank lines are skipped; a short row is padded with empty fields. Raises ``CaptionsError``
    naming the file and line for a row with more fields than the header (an unquoted comma in a
    caption) or a malformed one.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [c.strip().lower() for c in fields]
                continue
            if len(fields) > len(header) and any(f.strip() for f in fields[len(header):]):
                raise CaptionsError(f"line {reader.line_num} has {len(fields)} fields, the header "
                                    f"{len(header)} (quote captions that contain commas)", path)
            rows.append((reader.line_num, (fields + [""] * len(header))[: len(header)]))
    except csv.Error as e:
        raise CaptionsError(f"cannot parse CSV at line {reader.line_num}: {e}", path) from None
    if header is None:
        raise CaptionsError("the CSV is empty (expected a header line image,caption[,split])", path)
    return header, rows


def parse_csv_table(text: str, path: Path, images: Path, val_fraction: float = 0.05,
                    test_fraction: float = 0.05) -> Records:
    """Records of CSV ``text`` read from ``path`` (columns ``image``, ``caption``, optional
    ``split``); see ``read_csv_table``."""
    header, rows = csv_rows(text, path)
    missing = [c for c in ("image", "caption") if c not in header]
    if missing:
        raise CaptionsError(f"CSV lacks column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})", path)
    col = {name: header.index(name) for name in ("image", "caption", "split") if name in header}
    out, nameless, hashed = [], 0, False
    for line, fields in rows:
        name = fields[col["image"]].strip()
        if not name:
            nameless += 1
            continue
        given = fields[col["split"]].strip() if "split" in col else ""
        if not given:  # no split column, or a blank cell: no split given
            split, hashed = hash_split(name, val_fraction, test_fraction), True
        elif given.lower() in SPLIT_ALIASES:
            split = SPLIT_ALIASES[given.lower()]
        else:
            raise CaptionsError(f"line {line}: unknown split '{given}' (accepted: {ACCEPTED_SPLITS}; "
                                f"a blank cell means a hash split)", path)
        out.append((name, images / name, split, fields[col["caption"]]))
    records = merge_records(out)
    records.hash_split = hashed
    if nameless:
        log.warning("%s: %d row(s) without an image name; dropped", path, nameless)
        records.dropped[NO_IMAGE_NAME] += nameless
    return records


def read_csv_table(path: Path, images: Path | None, val_fraction: float = 0.05, test_fraction: float = 0.05,
                   encoding: str = "utf-8") -> Records:
    """Read a CSV with columns ``image`` and ``caption`` (and optionally ``split``).

    Images are at ``<images>/<image>`` (default: ``<csv dir>/images`` if it exists, else the csv's
    folder). Without a split column, or where a row's split cell is blank (or missing: a short
    row), the split is a stable hash of the image name. An image named in rows of two splits gives
    a record per split (``merge_records``; ``prepare`` skips the later ones). The text is read as
    ``encoding`` (a UTF-8 byte-order mark skipped); blank lines are skipped; rows without an image
    name are dropped and counted. Raises ``CaptionsError`` naming the file (and line) for a missing
    file or column, a byte not valid in ``encoding``, a row with too many fields or an unknown
    split (the message lists the accepted names).
    """
    text = read_text(path, encoding)
    if images is None:
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    return parse_csv_table(text, path, images, val_fraction, test_fraction)
