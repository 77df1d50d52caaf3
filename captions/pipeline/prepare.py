"""``captions prepare``: records -> tokens -> vocabulary -> encoded captions + resized images + manifest."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
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
from captions.pipeline.settings import PrepareOptions
from captions.pipeline.tokenize import get_tokenizer
from captions.pipeline.vocab import Vocabulary

log = logging.getLogger("captions")


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


@dataclass
class _Job:
    """One run's inputs and the identity (fingerprint) they give its output."""

    fmt: str
    out: Path
    sources: list[Path]
    images_root: Path | None
    opts: PrepareOptions
    source_info: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""

    @property
    def images_resolved(self) -> str | None:
        return str(self.images_root.resolve()) if self.images_root is not None else None


def _checked_inputs(sources: list[str | Path], images: str | Path | None) -> tuple[list[Path], Path | None]:
    """Source files and the images folder as paths; ``CaptionsError`` when one does not exist."""
    src_paths = [Path(s) for s in sources]
    for s in src_paths:
        if not s.is_file():
            raise CaptionsError("source file not found", s)
    images_root = Path(images) if images is not None else None
    if images_root is not None and not images_root.is_dir():
        raise CaptionsError("--images folder not found", images_root)
    return src_paths, images_root


def _fingerprint(job: _Job) -> None:
    """Hash the sources and everything else that changes the output into ``job``."""
    job.source_info = [{"path": str(s.resolve()), "sha256": sha256_file(s)} for s in job.sources]
    job.fingerprint = sha256_json({"format": job.fmt, "sources": [s["sha256"] for s in job.source_info],
                                   "images": job.images_resolved, **asdict(job.opts)})


def _usable_records(job: _Job, workers: int, progress: bool) -> tuple[list[ImageRecord], list[dict[str, str]], int]:
    """Read, clean and resize the records: (records whose image resized, skipped [{image, reason}],
    empty captions dropped). ``CaptionsError`` when no training image is left."""
    records = read_records(job.fmt, job.sources, job.images_root, job.opts)
    if not records:
        raise CaptionsError("no images found in the sources", job.sources[0])
    records, skipped, empty = clean_records(records)
    if empty:
        log.warning("dropped %d empty caption(s)", empty)

    store = job.out / "images"
    store.mkdir(parents=True, exist_ok=True)
    pairs = [(r.path, store / store_name(r.name)) for r in records]
    reasons = resize_all(pairs, job.opts.image_size, workers=workers, progress=progress)
    usable = []
    for r, reason in zip(records, reasons, strict=True):
        if reason is None:
            usable.append(r)
        else:
            skipped.append({"image": r.name, "reason": f"{reason}: {r.path}"})
    for s in skipped[:20]:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    if len(skipped) > 20:
        log.warning("... and %d more skipped images (all listed in %s)", len(skipped) - 20, job.out / MANIFEST)
    if not any(r.split == "train" for r in usable):
        raise CaptionsError(f"no usable training images ({len(skipped)} skipped; see the messages above)",
                            job.sources[0])
    return usable, skipped, empty


def _write_dataset(out: Path, usable: list[ImageRecord], tokens: list[list[list[str]]], vocab: Vocabulary,
                   max_length: int) -> list[int]:
    """Write annotations.json, captions.npz and vocab.json; return each caption row's image id."""
    encoded, image_ids = [], []
    for i, ts in enumerate(tokens):
        for t in ts:
            encoded.append(vocab.encode(t, max_length))
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
    return image_ids


def _manifest(job: _Job, vocab: Vocabulary, usable: list[ImageRecord], image_ids: list[int],
              skipped: list[dict[str, str]], empty: int) -> dict[str, Any]:
    """The manifest of the files just written (its key order is the file's)."""
    split_count = Counter(r.split for r in usable)
    caption_count = Counter(usable[i].split for i in image_ids)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_format": job.fmt,
        "sources": job.source_info,
        "images_root": job.images_resolved,
        "options": asdict(job.opts),
        "fingerprint": job.fingerprint,
        "vocab_size": len(vocab),
        "vocab_hash": vocab.hash,
        "dataset_hash": sha256_json({"annotations": sha256_file(job.out / "annotations.json"),
                                     "captions": sha256_file(job.out / "captions.npz"), "vocab": vocab.hash}),
        "counts": {s: {"images": split_count.get(s, 0), "captions": caption_count.get(s, 0)} for s in SPLITS},
        "empty_captions": empty,
        "skipped_count": len(skipped),
        "skipped": skipped,
    }


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
    manifest without doing anything; an interrupted run resumes its resize. Raises
    ``CaptionsError`` for a missing source or images folder, an unknown format or tokenizer, an
    ``out`` of another format version, or when no usable training image is left.
    """
    opts = options or PrepareOptions()
    tokenize = get_tokenizer(opts.tokenizer, opts.lang)  # fail on a bad tokenizer before any work
    out = Path(out)
    src_paths, images_root = _checked_inputs(sources, images)
    existing = read_manifest(out)  # refuses another format version before the sources are hashed
    job = _Job(fmt, out, src_paths, images_root, opts)
    _fingerprint(job)
    if existing is not None and existing.get("fingerprint") == job.fingerprint:
        log.info("%s: already prepared from the same sources and options; nothing to do", out)
        return existing
    if existing is not None:
        log.info("%s: sources or options changed; preparing again", out)
        (out / MANIFEST).unlink()  # the directory is incomplete until the new manifest lands

    usable, skipped, empty = _usable_records(job, workers, progress)
    tokens = [[tokenize(c) for c in r.captions] for r in usable]
    # the vocabulary sees training captions only, so val/test words stay unknown as in deployment
    vocab = Vocabulary.build((t for r, ts in zip(usable, tokens, strict=True) if r.split == "train" for t in ts),
                             opts.min_count)
    image_ids = _write_dataset(out, usable, tokens, vocab, opts.max_length)
    manifest = _manifest(job, vocab, usable, image_ids, skipped, empty)
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
