"""The prepared-dataset directory: its layout, format version, and the loader later stages use.

Layout of ``DIR``::

    manifest.json     written last: its presence means the directory is complete
    vocab.json        idx_to_token, token_to_idx, hash (and for subwords: tokenizer kind, file, sha256)
    tokenizer.json    subword vocabularies only: the Hugging Face tokenizer that encoded the captions
    annotations.json  images: id, name, file (in images/), split, raw captions, tokens
    captions.npz      captions (M, max_length+2) int32, image_ids (M,) int32
    images/           resized JPEGs (image_size x image_size, RGB; the comment names the source file)
    image_sources.json  path, size and modification time of each source image (the re-run check)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError
from captions.fsutil import read_json
from captions.pipeline.vocab import Vocabulary

FORMAT_NAME = "captions-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a prepared dataset, None when ``directory`` has none.

    Raises ``CaptionsError`` when it exists but is of another format or version.
    """
    path = directory / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CaptionsError("not a captions prepared-dataset manifest", path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CaptionsError(
            f"prepared with format version {manifest.get('format_version')}, this captions reads version "
            f"{FORMAT_VERSION}; re-run 'captions prepare' into a new directory",
            path,
        )
    return manifest


@dataclass
class PreparedDataset:
    """A loaded prepared-dataset directory.

    ``images``: list of dicts (id, name, file, split, captions, tokens), ``id`` == list index.
    ``captions``: (M, T) int32 encoded captions; ``image_ids``: (M,) int32 row -> image id.
    """

    root: Path
    manifest: dict[str, Any]
    vocab: Vocabulary
    images: list[dict[str, Any]]
    captions: np.ndarray
    image_ids: np.ndarray

    @property
    def dataset_hash(self) -> str:
        return self.manifest["dataset_hash"]

    @property
    def max_words(self) -> int:
        """Most words an encoded caption holds (its columns less ``<START>`` and ``<END>``)."""
        return int(self.captions.shape[1] - 2)

    def image_path(self, image_id: int) -> Path:
        """Path of the resized JPEG of image ``image_id``."""
        return self.root / self.images[image_id]["file"]

    def image_paths(self) -> list[Path]:
        """Paths of every image's resized JPEG, indexed by image id."""
        return [self.image_path(i) for i in range(len(self.images))]

    def split_image_ids(self, split: str) -> np.ndarray:
        """Ids of the images in ``split`` (int64, ascending)."""
        return np.array([im["id"] for im in self.images if im["split"] == split], dtype=np.int64)

    def require_split(self, split: str) -> np.ndarray:
        """``split_image_ids(split)``, refusing an empty split with the names of the splits there are."""
        ids = self.split_image_ids(split)
        if len(ids) == 0:
            splits = sorted({im["split"] for im in self.images})
            raise CaptionsError(f"no images in split '{split}' (this dataset has: {', '.join(splits)})", self.root)
        return ids

    def split_caption_rows(self, split: str) -> np.ndarray:
        """Rows of ``captions`` whose image is in ``split``."""
        in_split = np.array([im["split"] == split for im in self.images], dtype=bool)
        return np.nonzero(in_split[self.image_ids])[0]

    def references(self, split: str) -> dict[int, list[str]]:
        """image id -> its reference captions as space-joined words (all of them, unclamped; the
        word tokenizer's words also for a subword vocabulary, whose decoded captions are words)."""
        return {im["id"]: [" ".join(t) for t in im["tokens"]] for im in self.images if im["split"] == split}


def load_prepared(directory: str | Path) -> PreparedDataset:
    """Load a prepared dataset, refusing incomplete directories and other format versions."""
    root = Path(directory)
    manifest = read_manifest(root)
    if manifest is None:
        raise CaptionsError(f"not a prepared dataset (no {MANIFEST}); run 'captions prepare' first", root)
    vocab = Vocabulary.load(root / "vocab.json")
    if vocab.hash != manifest["vocab_hash"]:
        raise CaptionsError("vocab.json does not match the manifest's vocab_hash (edited by hand?)", root)
    images = read_json(root / "annotations.json")["images"]
    with np.load(root / "captions.npz") as z:
        captions, image_ids = z["captions"], z["image_ids"]
    return PreparedDataset(root, manifest, vocab, images, captions, image_ids)
