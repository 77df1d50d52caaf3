"""``captions prepare``: records -> tokens -> vocabulary -> encoded captions + resized images + manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from captions.data import FORMATS, ImageRecord, read_coco, read_csv_table, read_flickr8k, read_karpathy
from captions.data.records import DROP_IMAGE_SKIPPED, SPLITS, Records
from captions.errors import CaptionsError
from captions.fsutil import (
    atomic_path,
    fault_point,
    folder_lock,
    remove_stale_temporaries,
    sha256_file,
    sha256_json,
    sync_filesystem,
    text_codec,
    write_bytes_atomic,
    write_json_atomic,
    writing,
)
from captions.pipeline.prepared import FORMAT_NAME, FORMAT_VERSION, MANIFEST, read_manifest
from captions.pipeline.resize import resize_all, source_identity, store_name
from captions.pipeline.settings import PrepareOptions
from captions.pipeline.subword import build_vocabulary, tokenizer_identity
from captions.pipeline.tokenize import Tokenizer, get_tokenizer
from captions.pipeline.vocab import Vocabulary

log = logging.getLogger("captions")


DROP_EMPTY, DROP_NO_WORDS = "empty", "no words"  # and DROP_IMAGE_SKIPPED (records.py)
SOURCES_INDEX = "image_sources.json"  # each resized image's source file identity (the re-run check)


def read_records(fmt: str, sources: list[Path], images: Path | None, opts: PrepareOptions) -> Records:
    """Dispatch to the adapter for ``fmt``; the sources are read as ``opts.encoding``."""
    enc = opts.encoding
    if fmt == "coco":
        return read_coco(sources, images, enc)
    if fmt == "karpathy":
        return read_karpathy(sources, images, enc)
    if fmt == "flickr8k":
        return read_flickr8k(sources, images, opts.val_fraction, opts.test_fraction, enc)
    if fmt == "csv":
        records = Records()
        for s in sources:
            records.extend_from(read_csv_table(s, images, opts.val_fraction, opts.test_fraction, enc))
        return records
    raise CaptionsError(f"unknown format '{fmt}' (choose one of: {', '.join(FORMATS)})")


@dataclass
class Cleaned:
    """What ``clean_records`` leaves: the usable records (stripped captions), each caption's
    tokens, the images skipped ([{image, reason}]) and the captions dropped, by reason."""

    records: list[ImageRecord] = field(default_factory=list)
    tokens: list[list[list[str]]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)

    def skip(self, name: str, reason: str, captions: int) -> None:
        """Skip image ``name`` for ``reason``; its ``captions`` count as dropped with it."""
        self.skipped.append({"image": name, "reason": reason})
        if captions:
            self.dropped[DROP_IMAGE_SKIPPED] += captions


def _words(captions: list[str], tokenize: Tokenizer, dropped: Counter[str]) -> tuple[list[str], list[list[str]]]:
    """The captions that have words (stripped) and their tokens; the others counted in ``dropped``."""
    kept, tokens = [], []
    for c in captions:
        text = c.strip() if isinstance(c, str) else ""
        words = tokenize(text) if text else []
        if words:
            kept.append(text)
            tokens.append(words)
        else:  # only punctuation or emoji would train the model to end at once
            dropped[DROP_NO_WORDS if text else DROP_EMPTY] += 1
    return kept, tokens


def clean_records(records: list[ImageRecord], tokenize: Tokenizer) -> Cleaned:
    """Tokenize every caption and keep what can be used.

    Empty captions and captions without a word are dropped; images in no split, without any
    caption ("no caption"), without a caption left ("no caption with a word"), or named again in
    another split (the first split's record is kept) are skipped; an image named again in its own
    split gets the captions of both. This is the one place these rules live, so every reader gets
    them: a reader only has to keep an image's records of different splits apart. Every caption
    read is either kept or counted in ``dropped`` (which starts from the reader's own
    ``Records.dropped``; its ``Records.skipped`` images come first in ``skipped``).
    """
    out = Cleaned(skipped=list(getattr(records, "skipped", [])), dropped=Counter(getattr(records, "dropped", {})))
    kept_at: dict[str, int] = {}
    split_of: dict[str, str] = {}
    for r in records:
        caps, toks = _words(r.captions, tokenize, out.dropped)
        first = split_of.setdefault(r.name, r.split)
        if r.split not in SPLITS:
            out.skip(r.name, "not in any split list", len(caps))
        elif first != r.split:
            out.skip(r.name, f"named again in split '{r.split}' (first in '{first}')", len(caps))
        elif r.name in kept_at:
            i = kept_at[r.name]
            out.records[i].captions.extend(caps)
            out.tokens[i].extend(toks)
        elif not caps:
            out.skip(r.name, "no caption with a word" if r.captions else "no caption", 0)
        else:
            kept_at[r.name] = len(out.records)
            out.records.append(ImageRecord(r.name, r.path, r.split, caps))
            out.tokens.append(toks)
    return out


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
                                   "images": job.images_resolved, **job.opts.identity(),
                                   **tokenizer_identity(job.opts.tokenizer)})


def _usable_records(job: _Job, tokenize: Tokenizer, workers: int, progress: bool) -> tuple[Cleaned, int]:
    """Read, tokenize, clean and resize the records: the ``Cleaned`` records whose image resized
    (the others skipped, with their reasons) and the number of captions read. Writes the
    identity of every image it tried (``SOURCES_INDEX``). ``CaptionsError`` when no training
    image is left."""
    records = read_records(job.fmt, job.sources, job.images_root, job.opts)
    if not records:
        raise CaptionsError("no images found in the sources", job.sources[0])
    read = sum(len(r.captions) for r in records) + sum(records.dropped.values())
    cleaned = clean_records(records, tokenize)
    for reason in (DROP_EMPTY, DROP_NO_WORDS):
        if cleaned.dropped[reason]:
            log.warning("dropped %d caption(s): %s", cleaned.dropped[reason],
                        "empty" if reason == DROP_EMPTY else "no words (only punctuation or symbols)")

    store = job.out / "images"
    with writing(store):
        store.mkdir(parents=True, exist_ok=True)
    for folder in (job.out, store):  # what a killed run left half-written (we hold the lock: none is in use)
        remove_stale_temporaries(folder)
    pairs = [(r.path, store / store_name(r.name)) for r in cleaned.records]
    with writing(job.out / SOURCES_INDEX):
        write_json_atomic(job.out / SOURCES_INDEX, [[str(src), source_identity(src)] for src, _ in pairs])
    fault_point("prepare", "sources")
    reasons = resize_all(pairs, job.opts.image_size, workers=workers, progress=progress,
                         max_pixels=job.opts.max_pixels)
    usable = Cleaned(skipped=cleaned.skipped, dropped=cleaned.dropped)
    for r, toks, reason in zip(cleaned.records, cleaned.tokens, reasons, strict=True):
        if reason is None:
            usable.records.append(r)
            usable.tokens.append(toks)
        else:
            usable.skip(r.name, f"{reason}: {r.path}", len(r.captions))
    skipped = usable.skipped
    for s in skipped[:20]:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    if len(skipped) > 20:
        log.warning("... and %d more skipped images (all listed in %s)", len(skipped) - 20, job.out / MANIFEST)
    if not any(r.split == "train" for r in usable.records):
        raise CaptionsError(no_training_images(usable, records.hash_split, job.opts), job.sources[0])
    return usable, read


def no_training_images(usable: Cleaned, hash_split: bool, opts: PrepareOptions) -> str:
    """Why no training image is left, in one line: where the usable images are (and whether the
    hash split put them there), and how many were skipped (those are listed in the log above)."""
    where = Counter(r.split for r in usable.records)
    parts = []
    if usable.records:
        splits = " and ".join(f"{s} ({where[s]})" for s in SPLITS if where[s])
        parts.append(f"all {len(usable.records)} usable image(s) are in {splits}")
        if hash_split:
            parts[-1] += (f", by the hash split of their names (--val-fraction {opts.val_fraction:g}, "
                          f"--test-fraction {opts.test_fraction:g}): add images, or lower those fractions")
    if usable.skipped:
        parts.append(f"{len(usable.skipped)} image(s) skipped (see the messages above)")
    return "no usable training images: " + "; ".join(parts)


def stale_sources(out: Path) -> list[str]:
    """Source images whose file changed (size, modification time, presence, or path) since ``out``
    was prepared from them; every one when the record of them is missing."""
    try:
        index = json.loads((out / SOURCES_INDEX).read_text(encoding="utf-8"))
        return [src for src, identity in index if source_identity(src) != identity]
    except (OSError, ValueError, TypeError):
        return [str(out / SOURCES_INDEX)]


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
    with writing(out / "annotations.json"):
        write_json_atomic(out / "annotations.json", ann)
    fault_point("prepare", "annotations")
    with writing(out / "captions.npz"), atomic_path(out / "captions.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, captions=captions, image_ids=image_ids_arr)
    fault_point("prepare", "captions")
    with writing(out / "vocab.json"):
        vocab.save(out / "vocab.json")
    fault_point("prepare", "vocab")
    return image_ids


def _manifest(job: _Job, vocab: Vocabulary, usable: Cleaned, image_ids: list[int], read: int) -> dict[str, Any]:
    """The manifest of the files just written (its key order is the file's). Captions add up:
    ``captions_read`` = ``captions_kept`` + the sum of ``captions_dropped`` (reason -> count)."""
    split_count = Counter(r.split for r in usable.records)
    caption_count = Counter(usable.records[i].split for i in image_ids)
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
        "captions_read": read,
        "captions_kept": len(image_ids),
        "captions_dropped": dict(sorted(usable.dropped.items())),
        "empty_captions": usable.dropped[DROP_EMPTY] + usable.dropped[DROP_NO_WORDS],
        "skipped_count": len(usable.skipped),
        "skipped": usable.skipped,
    }


def _up_to_date(job: _Job, existing: dict[str, Any] | None) -> bool:
    """Whether ``existing`` (the manifest in ``job.out``) came from the same sources, options and
    source images (a repaired, replaced or moved image file prepares again)."""
    if existing is None or existing.get("fingerprint") != job.fingerprint:
        if existing is not None:
            log.info("%s: sources or options changed; preparing again", job.out)
        return False
    stale = stale_sources(job.out)
    if stale:
        log.info("%s: %d source image(s) changed since it was prepared (e.g. %s); preparing again", job.out,
                 len(stale), stale[0])
        return False
    return True


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
    ``prepare_synthetic``). Re-running with identical sources, options and source image files
    returns the existing manifest without doing anything; an interrupted run resumes its resize
    (keeping the resized images whose source file is unchanged). Raises ``CaptionsError`` for a
    missing source or images folder, an unknown format, tokenizer or encoding, a structural fault
    in a source (naming the file, entry and key), an ``out`` of another format version, or when
    no usable training image is left; ``CaptionsError`` naming the lock ``out/.prepare.lock`` and
    its holder when another ``prepare`` writes into ``out``; ``OutputError`` naming the path and
    the system's reason when ``out`` cannot be written (full, read-only): no manifest is written
    then, and no resized image is ever left truncated under its final name.
    """
    opts = options or PrepareOptions()
    tokenize = get_tokenizer(opts.tokenizer, opts.lang)  # fail on a bad tokenizer before any work
    text_codec(opts.encoding)  # and on an unknown encoding
    out = Path(out)
    src_paths, images_root = _checked_inputs(sources, images)
    with prepare_lock(out):
        return _prepare_locked(_Job(fmt, out, src_paths, images_root, opts), tokenize, workers, progress)


def prepare_lock(out: Path) -> contextlib.AbstractContextManager[Path]:
    """Create ``out`` and hold its lock ``out/.prepare.lock`` (``folder_lock``) for the block: one
    ``prepare`` at a time writes into a folder. ``CaptionsError`` when ``out`` is a file or another
    process holds the lock; ``OutputError`` when ``out`` cannot be created or written."""
    return folder_lock(out, "prepare")


def _prepare_locked(job: _Job, tokenize: Tokenizer, workers: int, progress: bool) -> dict[str, Any]:
    """``prepare`` once it holds the lock of ``job.out``: the manifest, existing or new."""
    out, opts = job.out, job.opts
    existing = _checked_out(out)  # refuses another format version before the sources are hashed
    _fingerprint(job)
    if _up_to_date(job, existing):
        log.info("%s: already prepared from the same sources and options; nothing to do", out)
        return existing
    if existing is not None:
        (out / MANIFEST).unlink()  # the directory is incomplete until the new manifest lands

    usable, read = _usable_records(job, tokenize, workers, progress)
    # the vocabulary sees training captions only, so val/test words stay unknown as in deployment
    vocab = build_vocabulary((t for r, ts in zip(usable.records, usable.tokens, strict=True) if r.split == "train"
                              for t in ts), opts, out)
    image_ids = _write_dataset(out, usable.records, usable.tokens, vocab, opts.max_length)
    manifest = _manifest(job, vocab, usable, image_ids, read)
    with writing(out):
        sync_filesystem(out)  # every file on the disk before the manifest: no crash can order it first
    # last: its presence marks the directory complete
    write_bytes_atomic(out / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode(),
                       fault=("prepare", "manifest"))
    return manifest


def _checked_out(out: Path) -> dict[str, Any] | None:
    """The manifest already in ``out`` (None when there is none); ``CaptionsError`` when ``out`` is
    a file or holds a prepared dataset of another format version."""
    if out.exists() and not out.is_dir():
        raise CaptionsError("--out is a file, not a folder", out)
    return read_manifest(out)


def prepare_synthetic(out: str | Path, n_train: int = 1200, n_val: int = 150, n_test: int = 150,
                      seed: int = 0, options: PrepareOptions | None = None, workers: int = -1,
                      progress: bool = True) -> dict[str, Any]:
    """Generate the synthetic shapes set under ``out/source`` and prepare it (COCO path) into ``out``.

    Everything ``prepare`` would refuse without looking at the images (image counts: train at
    least 1, val and test at least 0; the tokenizer, the encoding, an ``out`` of another format
    version) is refused with ``CaptionsError`` before anything is written.
    """
    from captions.data.synthetic import generate_synthetic

    out = Path(out)
    opts = options or PrepareOptions(min_count=1, image_size=128)
    if n_train < 1 or n_val < 0 or n_test < 0:
        raise CaptionsError(f"image counts must be train >= 1, val >= 0, test >= 0; got {n_train},{n_val},{n_test}")
    tokenize = get_tokenizer(opts.tokenizer, opts.lang)
    text_codec(opts.encoding)
    _checked_out(out)
    with prepare_lock(out):  # held from the generation on: it writes into out too
        with writing(out / "source"):  # a full or read-only disk: one line naming the folder
            sources = generate_synthetic(out / "source", n_train, n_val, n_test, seed=seed)
        src_paths, images_root = _checked_inputs(sources, out / "source")
        return _prepare_locked(_Job("coco", out, src_paths, images_root, opts), tokenize, workers, progress)


def default_workers() -> int:
    """All cores (``--workers`` default)."""
    return os.cpu_count() or 1
