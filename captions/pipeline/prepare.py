"""``captions prepare``: records -> tokens -> vocabulary -> encoded captions + resized images + manifest."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from captions.data import FORMATS, ImageRecord, read_coco, read_csv_table, read_flickr8k, read_karpathy
from captions.data.records import SPLITS
from captions.errors import CaptionsError
from captions.fsutil import atomic_path, sha256_file, sha256_json, write_json_atomic
from captions.pipeline.prepared import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_manifest
from captions.pipeline.resize import resize_all, store_name
from captions.pipeline.tokenize import get_tokenizer
from captions.pipeline.vocab import Vocabulary

log = logging.getLogger("captions")


@dataclass
class PrepareOptions:
    """Everything that changes the prepared output (part of the run's fingerprint)."""

    tokenizer: str = "simple"
    lang: str = "en"
    min_count: int = 5
    max_length: int = 16
    image_size: int = 256
    val_fraction: float = 0.05
    test_fraction: float = 0.05


def read_records(fmt: str, sources: list[Path], images: Path | None, opts: PrepareOptions) -> list[ImageRecord]:
    """Dispatch to the adapter for ``fmt``."""
    if fmt == "coco":
        return read_coco(sources, images)
    if fmt == "karpathy":
        return read_karpathy(sources, images)
    if fmt == "flickr8k":
        return read_flickr8k(sources, images, opts.val_fraction, opts.test_fraction)
    if fmt == "csv":
        return [r for s in sources for r in read_csv_table(s, images, opts.val_fraction, opts.test_fraction)]
    raise CaptionsError(f"unknown format '{fmt}' (choose one of: {', '.join(FORMATS)})")


def clean_records(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[dict[str, str]], int]:
    """Drop empty captions and images that cannot be used.

    Returns (usable records, skipped [{image, reason}], number of empty captions dropped).
    """
    kept, skipped, empty = [], [], 0
    for r in records:
        caps = [c.strip() for c in r.captions if isinstance(c, str)]
        nonempty = [c for c in caps if c]
        empty += len(r.captions) - len(nonempty)
        if r.split not in SPLITS:
            skipped.append({"image": r.name, "reason": "not in any split list"})
        elif not nonempty:
            skipped.append({"image": r.name, "reason": "no non-empty caption"})
        else:
            kept.append(ImageRecord(r.name, r.path, r.split, nonempty))
    return kept, skipped, empty


def prepare(
    fmt: str,
    sources: list[str | Path],
    out: str | Path,
    images: str | Path | None = None,
    options: PrepareOptions | None = None,
    workers: int = -1,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare a dataset into ``out`` and return its manifest.

    ``fmt`` is one of ``coco``, ``flickr8k``, ``karpathy``, ``csv`` (``synthetic`` is handled by
    ``prepare_synthetic``). Re-running with identical sources and options returns the existing
    manifest without doing anything; an interrupted run resumes its resize.
    """
    opts = options or PrepareOptions()
    tokenize = get_tokenizer(opts.tokenizer, opts.lang)  # fail on a bad tokenizer before any work
    out = Path(out)
    src_paths = [Path(s) for s in sources]
    for s in src_paths:
        if not s.is_file():
            raise CaptionsError("source file not found", s)
    images_root = Path(images) if images is not None else None
    if images_root is not None and not images_root.is_dir():
        raise CaptionsError("--images folder not found", images_root)

    existing = read_manifest(out)  # refuses another format version
    source_info = [{"path": str(s.resolve()), "sha256": sha256_file(s)} for s in src_paths]
    fingerprint = sha256_json({"format": fmt, "sources": [s["sha256"] for s in source_info],
                               "images": str(images_root.resolve()) if images_root else None, **asdict(opts)})
    if existing is not None and existing.get("fingerprint") == fingerprint:
        log.info("%s: already prepared from the same sources and options; nothing to do", out)
        return existing
    if existing is not None:
        log.info("%s: sources or options changed; preparing again", out)
        (out / MANIFEST).unlink()  # the directory is incomplete until the new manifest lands

    records = read_records(fmt, src_paths, images_root, opts)
    if not records:
        raise CaptionsError("no images found in the sources", src_paths[0])
    records, skipped, empty = clean_records(records)
    if empty:
        log.warning("dropped %d empty caption(s)", empty)

    store = out / "images"
    store.mkdir(parents=True, exist_ok=True)
    pairs = [(r.path, store / store_name(r.name)) for r in records]
    reasons = resize_all(pairs, opts.image_size, workers=workers, progress=progress)
    usable = []
    for r, reason in zip(records, reasons, strict=True):
        if reason is None:
            usable.append(r)
        else:
            skipped.append({"image": r.name, "reason": f"{reason}: {r.path}"})
    for s in skipped[:20]:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    if len(skipped) > 20:
        log.warning("... and %d more skipped images (all listed in %s)", len(skipped) - 20, out / MANIFEST)
    if not any(r.split == "train" for r in usable):
        raise CaptionsError(f"no usable training images ({len(skipped)} skipped; see the messages above)",
                            src_paths[0])

    tokens = [[tokenize(c) for c in r.captions] for r in usable]
    vocab = Vocabulary.build((t for r, ts in zip(usable, tokens, strict=True) if r.split == "train" for t in ts),
                             opts.min_count)
    encoded, image_ids = [], []
    for i, ts in enumerate(tokens):
        for t in ts:
            encoded.append(vocab.encode(t, opts.max_length))
            image_ids.append(i)
    captions = np.stack(encoded).astype(np.int32)
    image_ids_arr = np.asarray(image_ids, dtype=np.int32)

    ann = {"images": [
        {"id": i, "name": r.name, "file": f"images/{store_name(r.name)}", "split": r.split,
         "captions": r.captions, "tokens": ts}
        for i, (r, ts) in enumerate(zip(usable, tokens, strict=True))
    ]}
    write_json_atomic(out / "annotations.json", ann)
    with atomic_path(out / "captions.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, captions=captions, image_ids=image_ids_arr)
    vocab.save(out / "vocab.json")

    split_count = Counter(r.split for r in usable)
    caption_count = Counter(usable[i].split for i in image_ids)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_format": fmt,
        "sources": source_info,
        "images_root": str(images_root.resolve()) if images_root else None,
        "options": asdict(opts),
        "fingerprint": fingerprint,
        "vocab_size": len(vocab),
        "vocab_hash": vocab.hash,
        "dataset_hash": sha256_json({"annotations": sha256_file(out / "annotations.json"),
                                     "captions": sha256_file(out / "captions.npz"), "vocab": vocab.hash}),
        "counts": {s: {"images": split_count.get(s, 0), "captions": caption_count.get(s, 0)} for s in SPLITS},
        "empty_captions": empty,
        "skipped_count": len(skipped),
        "skipped": skipped,
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: its presence marks the directory complete
    return manifest


def prepare_synthetic(out: str | Path, n_train: int = 1200, n_val: int = 150, n_test: int = 150,
                      seed: int = 0, options: PrepareOptions | None = None, workers: int = -1,
                      progress: bool = True) -> dict[str, Any]:
    """Generate the synthetic shapes set under ``out/source`` and prepare it (COCO path) into ``out``."""
    from captions.data.synthetic import generate_synthetic

    out = Path(out)
    opts = options or PrepareOptions(min_count=1, image_size=128)
    sources = generate_synthetic(out / "source", n_train, n_val, n_test, seed=seed)
    return prepare("coco", sources, out, images=out / "source", options=opts, workers=workers, progress=progress)


def default_workers() -> int:
    """All cores (``--workers`` default)."""
    return os.cpu_count() or 1
