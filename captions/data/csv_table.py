"""Adapter for plain CSV tables: ``image,caption[,split]``."""

from __future__ import annotations

from pathlib import Path

from captions.data.records import SPLITS, ImageRecord, merge_records
from captions.data.splits import hash_split
from captions.errors import CaptionsError

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "valid": "val", "test": "test"}


def read_csv_table(
    path: Path, images: Path | None, val_fraction: float = 0.05, test_fraction: float = 0.05
) -> list[ImageRecord]:
    """Read a CSV with columns ``image`` and ``caption`` (and optionally ``split``).

    Images are at ``<images>/<image>`` (default: ``<csv dir>/images`` if it exists, else the csv's
    folder). Without a split column the split is a stable hash of the image name.
    """
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except FileNotFoundError:
        raise CaptionsError("file not found", path) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CaptionsError(f"cannot parse CSV: {str(e).splitlines()[0]}", path) from None
    df.columns = [c.strip().lower() for c in df.columns]
    missing = [c for c in ("image", "caption") if c not in df.columns]
    if missing:
        raise CaptionsError(
            f"CSV lacks column(s) {', '.join(missing)} (has: {', '.join(df.columns) or 'none'})", path
        )
    if images is None:
        images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    has_split = "split" in df.columns
    rows = []
    for i, (name, caption) in enumerate(zip(df["image"], df["caption"], strict=True)):
        name = name.strip()
        if has_split:
            raw = df["split"].iat[i].strip().lower()
            if raw not in SPLIT_ALIASES:
                raise CaptionsError(f"row {i + 2}: unknown split {raw!r} (expected one of {SPLITS})", path)
            split = SPLIT_ALIASES[raw]
        else:
            split = hash_split(name, val_fraction, test_fraction)
        rows.append((name, images / name, split, caption))
    return merge_records(rows)
