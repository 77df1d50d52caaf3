"""Feeding the trainer: caption batches in a reproducible order, features from RAM or streamed.

An image's features are stored once (in the cache), never once per caption: batches carry
caption rows, and the features of their images are gathered per batch.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from captions.features.cache import FeatureCache
from captions.pipeline.prepared import PreparedDataset
from captions.pipeline.vocab import NULL_ID

log = logging.getLogger("captions")


def epoch_batches(rows: np.ndarray, image_of_row: np.ndarray, batch_size: int, seed: int, epoch: int,
                  block_images: int | None = None) -> list[np.ndarray]:
    """The caption-row batches of one epoch, a pure function of (seed, epoch) so a resumed run
    replays the same order.

    ``rows``: caption rows to train on; ``image_of_row``: image id (cache row) of every caption row.
    Images come in random order with all their captions together (in random order), so a batch
    holds whole images, at most ``batch_size`` captions (unless one image has more), and each
    image's features are gathered and projected once. With ``block_images`` (streaming), images
    are grouped in blocks of consecutive ids; blocks come in random order and a batch never spans
    two blocks, so each block is read from disk once.
    """
    rng = np.random.default_rng([seed, epoch])
    rows = rows[rng.permutation(len(rows))]  # the order of an image's captions
    images = image_of_row[rows]
    uniq, image_pos = np.unique(images, return_inverse=True)
    image_key = rng.permutation(len(uniq))[image_pos]
    block = images // block_images if block_images is not None else np.zeros_like(images)
    block_key = rng.permutation(int(block.max(initial=0)) + 1)[block]
    order = np.lexsort((image_key, block_key))  # stable: captions keep their shuffled order
    rows, images, block_key = rows[order], images[order], block_key[order]
    starts = np.r_[np.flatnonzero(images[1:] != images[:-1]) + 1, len(rows)]  # where each image begins
    edges = [0]
    for start, end in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        # a batch takes whole images up to batch_size captions (one image may exceed it alone)
        if block_key[start] != block_key[start - 1] or end - edges[-1] > batch_size:
            edges.append(start)
    edges.append(len(rows))
    return [rows[a:e] for a, e in zip(edges[:-1], edges[1:], strict=True) if e > a]


def caption_tokens(ds: PreparedDataset, rows: np.ndarray) -> torch.Tensor:
    """Token ids of caption ``rows`` (N,) as a long tensor (N, T'), without the all-``<NULL>``
    tail columns."""
    caps = torch.from_numpy(ds.captions[rows]).long()
    longest = int((caps != NULL_ID).sum(dim=1).max())
    return caps[:, :longest]


def images_of_batch(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image ids of a batch's captions (N,) -> (its distinct images (M,) in order of first
    appearance, the position of each caption's image among them (N,))."""
    uniq, first, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)]


class FeatureStore:
    """Features by image id, as float32 tensors on ``device``.

    In RAM (float16/32 as stored) when the needed array fits ``ram_budget`` bytes, otherwise
    streamed: ``block_images`` consecutive rows are read at a time (a contiguous, chunk-aligned
    HDF5 read), the next block being prefetched in a background thread.
    """

    def __init__(self, cache: FeatureCache, spatial: bool, ram_budget: int, device: torch.device) -> None:
        self.cache, self.spatial, self.device = cache, spatial, device
        ds = cache.array("spatial" if spatial else "pooled")
        self.dataset = ds
        row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        self.in_ram = row_bytes * ds.shape[0] <= ram_budget
        if self.in_ram:
            self.block_images = None
            self.array = torch.from_numpy(ds[:])
            log.info("features in RAM: %.1f MB", self.array.numel() * self.array.element_size() / 1e6)
        else:
            chunk = cache.chunk_rows
            # two blocks live at once (current + prefetched): each gets a third of the budget
            self.block_images = max(chunk, (ram_budget // 3 // row_bytes) // chunk * chunk)
            log.info("features streamed from %s in blocks of %d images (%.0f MB each)", cache.path,
                     self.block_images, self.block_images * row_bytes / 1e6)
        self._block: tuple[int, torch.Tensor] | None = None
        self._prefetch: tuple[int, threading.Thread, list] | None = None

    def _read_block(self, b: int) -> torch.Tensor:
        a = b * self.block_images
        return torch.from_numpy(self.dataset[a : min(a + self.block_images, self.dataset.shape[0])])

    def prefetch(self, b: int) -> None:
        """Start reading block ``b`` in the background (streaming mode only)."""
        if (self.in_ram or (self._prefetch is not None and self._prefetch[0] == b)
                or (self._block is not None and self._block[0] == b)):  # already read or being read
            return
        box: list = []
        t = threading.Thread(target=lambda: box.append(self._read_block(b)), daemon=True)
        t.start()
        self._prefetch = (b, t, box)

    def _block_tensor(self, b: int) -> torch.Tensor:
        if self._block is not None and self._block[0] == b:
            return self._block[1]
        if self._prefetch is not None and self._prefetch[0] == b:
            _, t, box = self._prefetch
            t.join()
            self._prefetch = None
            tensor = box[0] if box else self._read_block(b)
        else:
            tensor = self._read_block(b)
        self._block = (b, tensor)
        return tensor

    def gather_sorted(self, image_ids: np.ndarray) -> torch.Tensor:
        """Features of any image ids (B,), read directly when streaming (for evaluation)."""
        if self.in_ram:
            return self.gather(image_ids)
        ids = np.asarray(image_ids, dtype=np.int64)
        order = np.argsort(ids)
        rows = np.empty_like(order)
        rows[order] = np.arange(len(ids))
        uniq, inverse = np.unique(ids[order], return_inverse=True)
        feats = torch.from_numpy(self.dataset[uniq])[torch.from_numpy(inverse)][torch.from_numpy(rows)]
        return feats.to(self.device).float()

    def gather(self, image_ids: np.ndarray) -> torch.Tensor:
        """image ids (B,) -> features (B, C) or (B, P, C) float32 on the device."""
        idx = torch.from_numpy(np.asarray(image_ids, dtype=np.int64))
        if self.in_ram:
            feats = self.array.index_select(0, idx)
        else:
            b = int(image_ids[0]) // self.block_images
            block = self._block_tensor(b)
            feats = block.index_select(0, idx - b * self.block_images)
        return feats.to(self.device, non_blocking=True).float()
