"""``captions evaluate``: decode a split from the feature cache (or from the checkpoint's own
encoder run on the split's images) and score it with pycocoevalcap.

Writes the predictions in COCO results format (``[{"image_id", "caption", "file_name"}]``; the
id is the prepared dataset's image id) and the metrics as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.errors import CaptionsError, output_error
from captions.features.cache import FeatureCache
from captions.features.spec import FeatureSpec
from captions.fsutil import atomic_path, fault_point, folder_lock
from captions.generation import Rules, caption_images
from captions.metrics import cider_defined, java_available, score_captions
from captions.models.checkpoint import LoadedDecoder, load_decoder
from captions.pipeline.prepared import PreparedDataset, load_prepared
from captions.runtime import resolve_device

log = logging.getLogger("captions")

METRIC_ORDER = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


def default_eval_dir(checkpoint: Path, split: str, beam_size: int) -> Path:
    """``<checkpoint dir>/eval-<checkpoint stem>-<split>-beam<K>``."""
    return checkpoint.parent / f"eval-{checkpoint.stem}-{split}-beam{beam_size}"


def check_compatible(ckpt: dict[str, Any], cache: FeatureCache, vocab_hash: str, checkpoint: Path) -> None:
    """Refuse a cache whose features the checkpoint's decoder cannot read (``FeatureSpec.DECODER_KEYS``
    differ), or a dataset with another vocabulary. Raises ``CaptionsError`` naming the checkpoint."""
    tuned = ckpt.get("encoder") is not None
    what = (f"the checkpoint's encoder was fine-tuned: {cache.path} holds features of other weights; leave out "
            f"--features to run its encoder on the images" if tuned
            else f"the checkpoint was trained on other features than {cache.path}")
    FeatureSpec.from_dict(ckpt.get("features") or {}, path=checkpoint).require_compatible(
        cache.spec, FeatureSpec.DECODER_KEYS, what=what, path=checkpoint)
    check_vocabulary(ckpt, vocab_hash, checkpoint)


def check_vocabulary(ckpt: dict[str, Any], vocab_hash: str, checkpoint: Path) -> None:
    """Refuse a dataset with another vocabulary than the checkpoint's. Raises ``CaptionsError``
    naming the checkpoint."""
    if ckpt["vocab"].get("hash") != vocab_hash:
        raise CaptionsError("the checkpoint's vocabulary differs from the dataset's (trained on another prepared "
                            "dataset?): token ids would not match", checkpoint)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike,
                        features: str | os.PathLike | None,
                        split: str = "test", beam_size: int = 3, length_penalty: float = 0.0,
                        device: str = "auto", batch_size: int = 64, out: str | os.PathLike | None = None,
                        progress: bool = False, min_length: int = 1,
                        weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Caption every image of ``split`` (with features) and score against all its references.

    Captions have at least ``min_length`` words (``Rules``). Returns the metrics record (also
    written to ``out/metrics.json``): checkpoint, split, images, beam_size, length_penalty,
    min_length, metrics (BLEU-1..4, METEOR when Java is available, ROUGE-L, CIDEr when defined),
    skipped_metrics, undefined_metrics, seconds, predictions (path of ``out/predictions.json``).
    ``out`` defaults to ``default_eval_dir(checkpoint, split, beam_size)``. ``features`` None:
    the checkpoint's backbone (its fine-tuned encoder, when it has one; else rebuilt as
    ``Captioner.from_checkpoint`` does, from the ``weights`` file when its features came from one)
    runs on the split's images as extraction would (``encoded_split``). Raises ``CaptionsError``
    for an empty split or one whose images all lack features, and for a cache the checkpoint's
    decoder cannot read.
    """
    from tqdm import tqdm

    checkpoint = Path(checkpoint)
    if beam_size < 1:
        raise CaptionsError(f"beam size must be at least 1, got {beam_size}")
    if features is not None and weights is not None:
        raise CaptionsError("--weights applies only without --features (when the backbone runs on the images)")
    dev = resolve_device(device)
    dec = load_decoder(checkpoint, dev)
    ds = load_prepared(data_dir)
    out_dir = Path(out) if out is not None else default_eval_dir(checkpoint, split, beam_size)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if features is None:
            check_vocabulary(dec.checkpoint, ds.vocab.hash, checkpoint)
            ids, read_rows = encoded_split(checkpoint, ds, split, dev, batch_size, weights)
        else:
            cache = stack.enter_context(FeatureCache(features))
            ids, read_rows = cached_split(dec, ds, cache, checkpoint, split, dev)
        bar = stack.enter_context(tqdm(total=len(ids), desc=f"decode {split}", unit="img", disable=not progress))
        preds = caption_images(dec.model, ids, read_rows, dec.max_length + 1, dec.idx_to_token, batch_size, beam_size,
                               length_penalty, on_batch=bar.update, rules=Rules(min_length=min_length))
    decode_s = time.perf_counter() - t0
    record = {"checkpoint": str(checkpoint), "model": dec.checkpoint["model"], "data": str(data_dir),
              "features": str(features) if features is not None else "(the checkpoint's encoder)", "split": split,
              "beam_size": beam_size, "length_penalty": length_penalty,
              "min_length": min_length, "decode_seconds": round(decode_s, 3),
              "images_left_out": int(len(ds.require_split(split)) - len(ids))}  # unreadable / without features
    return score_and_write(ds, preds, split, out_dir, record)


def encoded_split(checkpoint: Path, ds: PreparedDataset, split: str, device: torch.device, batch_size: int,
                  weights: str | os.PathLike | None = None) -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    """Run checkpoint's backbone (``Captioner.from_checkpoint``: its fine-tuned encoder when it has
    one, else the recorded backbone, from the ``weights`` file when its features came from one) over
    the images of ``split``, decoded and cropped as extraction does, features rounded through the
    recorded dtype. Returns (the ids of the images that could be read, a reader of their features
    by id: (B,) -> float32 (B, ...)); unreadable images are logged and left out. Raises
    ``CaptionsError`` when none can be read."""
    from captions.captioner import Captioner
    from captions.features.extract import encode_images

    cap = Captioner.from_checkpoint(checkpoint, device=device, weights=weights)
    ids = ds.require_split(split)
    paths = ds.image_paths()
    good_ids, feats = encode_images(paths, ids, cap.preprocessing, cap.features, batch_size, "left out")
    if feats is None:
        raise CaptionsError(f"none of the {len(ids)} '{split}' image(s) could be read: nothing to caption", ds.root)
    pos = {int(k): j for j, k in enumerate(good_ids)}

    def read_rows(batch: np.ndarray) -> torch.Tensor:
        return feats[torch.tensor([pos[int(k)] for k in batch])].to(device)

    return good_ids, read_rows


def cached_split(dec: LoadedDecoder, ds: PreparedDataset, cache: FeatureCache, checkpoint: Path, split: str,
                 device: torch.device) -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    """The ids of ``split``'s images with features in the open ``cache`` (checked against the
    checkpoint and dataset) and a reader of their features by ascending ids: (B,) -> float32
    (B, P, C) spatial or (B, C) pooled, as the decoder reads. Raises ``CaptionsError`` for a cache
    of other features or another dataset, or one where no image of the split has features."""
    cache.check_dataset(ds.dataset_hash, what=str(ds.root))
    check_compatible(dec.checkpoint, cache, ds.vocab.hash, checkpoint)
    ids = with_features(ds.require_split(split), cache, split)
    source = cache.array("spatial" if dec.model.uses_spatial else "pooled")

    def read_rows(batch: np.ndarray) -> torch.Tensor:  # ids ascending: one h5py read per batch
        return torch.from_numpy(np.asarray(source[batch])).to(device).float()

    return ids, read_rows


def with_features(ids: np.ndarray, cache: FeatureCache, split: str) -> np.ndarray:
    """The image ids (B,) of ``split`` that have features in ``cache``; those without are left out
    with a warning. Raises ``CaptionsError`` naming the cache when none has any."""
    valid = cache.valid[ids]
    if not valid.any():
        raise CaptionsError(f"none of the {len(ids)} '{split}' image(s) has features (all were unreadable at "
                            f"extraction): nothing to caption", cache.path)
    if not valid.all():
        log.warning("%d %s image(s) have no features (unreadable at extraction); left out", int((~valid).sum()), split)
    return ids[valid]


def score_and_write(ds: PreparedDataset, preds: dict[int, str], split: str, out_dir: str | os.PathLike,
                    record: dict[str, Any]) -> dict[str, Any]:
    """Score ``preds`` (image id -> caption) against all references of ``split``; write
    ``out_dir/predictions.json`` (COCO results format) and ``out_dir/metrics.json``.

    Returns ``record`` extended with images, metrics, skipped_metrics, undefined_metrics (CIDEr
    below two images: left out of metrics, never 0) and predictions (its path). The two files are
    written as one (``write_outputs``; ``OutputError`` when they cannot be).
    """
    out_dir = Path(out_dir)
    scores = score_captions(ds.references(split), preds)
    undefined = [] if cider_defined(len(preds)) else ["CIDEr"]
    results = [{"image_id": img, "caption": text, "file_name": ds.images[img]["name"]} for img, text in preds.items()]
    record = {**record, "images": len(preds), "metrics": {k: scores[k] for k in METRIC_ORDER if k in scores},
              "skipped_metrics": [] if java_available() else ["METEOR"], "undefined_metrics": undefined,
              "predictions": str(out_dir / "predictions.json")}
    write_outputs(out_dir, {"metrics.json": record, "predictions.json": results})
    return record


def write_outputs(out_dir: Path, files: dict[str, Any]) -> None:
    """Write ``files`` (name -> JSON value) into ``out_dir`` as one: each to a temporary name, then,
    once all are written, renamed in reverse order, so the first named (metrics.json) appears last
    and marks the set done; a set is never a mix of two runs (``.evaluate.lock`` is held). Raises
    ``OutputError`` naming the file and the system's reason (a full disk, a read-only folder);
    nothing is then renamed."""
    target = out_dir
    try:
        with folder_lock(out_dir, "evaluate"), contextlib.ExitStack() as renames:
            for name, value in files.items():
                target = out_dir / name
                tmp = renames.enter_context(atomic_path(target))
                tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                fault_point("evaluate", "written")
    except OSError as e:
        raise output_error(target, e, "nothing was written") from None


def metrics_table(metrics: dict[str, float], undefined: list[str] | tuple[str, ...] = ()) -> str:
    """The metrics as a two-line aligned text table; the ``undefined`` ones show as ``undef``."""
    keys = [k for k in METRIC_ORDER if k in metrics or k in undefined]
    width = [max(len(k), 6) for k in keys]
    head = "  ".join(k.rjust(w) for k, w in zip(keys, width, strict=True))
    vals = "  ".join((f"{metrics[k]:.3f}" if k in metrics else "undef").rjust(w)
                     for k, w in zip(keys, width, strict=True))
    return f"{head}\n{vals}"
