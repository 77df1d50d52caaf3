"""``captions evaluate``: decode a split from the feature cache and score it with pycocoevalcap.

Writes the predictions in COCO results format (``[{"image_id", "caption", "file_name"}]``; the
id is the prepared dataset's image id) and the metrics as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
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
from captions.models.checkpoint import load_decoder
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
    FeatureSpec.from_dict(ckpt.get("features") or {}, path=checkpoint).require_compatible(
        cache.spec, FeatureSpec.DECODER_KEYS, what=f"the checkpoint was trained on other features than {cache.path}",
        path=checkpoint)
    if ckpt["vocab"].get("hash") != vocab_hash:
        raise CaptionsError("the checkpoint's vocabulary differs from the dataset's (trained on another prepared "
                            "dataset?): token ids would not match", checkpoint)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data_dir: str | os.PathLike, features: str | os.PathLike,
                        split: str = "test", beam_size: int = 3, length_penalty: float = 0.0,
                        device: str = "auto", batch_size: int = 64, out: str | os.PathLike | None = None,
                        progress: bool = False, min_length: int = 1) -> dict[str, Any]:
    """Caption every image of ``split`` (with features) and score against all its references.

    Captions have at least ``min_length`` words (``Rules``). Returns the metrics record (also
    written to ``out/metrics.json``): checkpoint, split, images, beam_size, length_penalty,
    min_length, metrics (BLEU-1..4, METEOR when Java is available, ROUGE-L, CIDEr when defined),
    skipped_metrics, undefined_metrics, seconds, predictions (path of ``out/predictions.json``).
    ``out`` defaults to ``default_eval_dir(checkpoint, split, beam_size)``. Raises
    ``CaptionsError`` for an empty split or one whose images all lack features.
    """
    from tqdm import tqdm

    checkpoint = Path(checkpoint)
    if beam_size < 1:
        raise CaptionsError(f"beam size must be at least 1, got {beam_size}")
    dev = resolve_device(device)
    dec = load_decoder(checkpoint, dev)
    ds = load_prepared(data_dir)
    out_dir = Path(out) if out is not None else default_eval_dir(checkpoint, split, beam_size)
    t0 = time.perf_counter()
    with FeatureCache(features) as cache:
        cache.check_dataset(ds.dataset_hash, what=str(data_dir))
        check_compatible(dec.checkpoint, cache, ds.vocab.hash, checkpoint)
        ids = with_features(ds.require_split(split), cache, split)
        source = cache.array("spatial" if dec.model.uses_spatial else "pooled")

        def read_rows(batch: np.ndarray) -> torch.Tensor:  # ids ascending: one h5py read per batch
            return torch.from_numpy(np.asarray(source[batch])).to(dev).float()

        bar = tqdm(total=len(ids), desc=f"decode {split}", unit="img", disable=not progress)
        preds = caption_images(dec.model, ids, read_rows, dec.max_length + 1, dec.idx_to_token, batch_size, beam_size,
                               length_penalty, on_batch=bar.update, rules=Rules(min_length=min_length))
        bar.close()
    decode_s = time.perf_counter() - t0
    record = {"checkpoint": str(checkpoint), "model": dec.checkpoint["model"], "data": str(data_dir),
              "features": str(features), "split": split, "beam_size": beam_size, "length_penalty": length_penalty,
              "min_length": min_length, "decode_seconds": round(decode_s, 3)}
    return score_and_write(ds, preds, split, out_dir, record)


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
