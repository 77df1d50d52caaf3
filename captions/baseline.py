"""Nearest-neighbour caption retrieval (Devlin et al. 2015): a classic strong baseline on the same cache.

For each query image, take the training captions of its k most similar training images (cosine
similarity of pooled features) and return the consensus caption: the candidate with the highest
mean similarity to the other candidates, similarity being the cosine of CIDEr-style TF-IDF
vectors of 1- to 4-grams (document frequencies from the training references).
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.cider import document_frequencies, ngram_counts, tfidf
from captions.errors import CaptionsError
from captions.features.cache import FeatureCache
from captions.pipeline.prepared import PreparedDataset, load_prepared


def tfidf_vectors(captions: list[list[str]], doc_freq: Counter, n_docs: int) -> list[dict]:
    """Unit-norm TF-IDF vectors (dict n-gram -> weight) of tokenized captions.

    The weights are CIDEr-D's (``captions.cider.tfidf``) over all 1- to 4-grams at once; a caption
    whose weights are all zero keeps a zero vector.
    """
    out = []
    for toks in captions:
        vec = tfidf(ngram_counts(toks), doc_freq, n_docs)
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        out.append({g: v / norm for g, v in vec.items()})
    return out


def consensus(vectors: list[dict]) -> int:
    """Index of the vector with the highest mean cosine similarity to the others."""
    n = len(vectors)
    sims = np.zeros((n, n))
    for i in range(n):
        vi = vectors[i]
        for j in range(i + 1, n):
            vj = vectors[j]
            small, big = (vi, vj) if len(vi) < len(vj) else (vj, vi)
            sims[i, j] = sims[j, i] = sum(w * big.get(g, 0.0) for g, w in small.items())
    return int(sims.sum(1).argmax())


def nn_captions(ds: PreparedDataset, cache: FeatureCache, split: str = "val", k: int = 10,
                batch: int = 512) -> dict[int, str]:
    """image id -> retrieved consensus caption (space-joined tokens) for every image of ``split``
    that has features. Raises ``CaptionsError`` when no training image has features."""
    cache.check_dataset(ds.dataset_hash)
    valid = cache.valid
    train_ids = np.array([i for i in ds.split_image_ids("train") if valid[i]], dtype=np.int64)
    query_ids = np.array([i for i in ds.split_image_ids(split) if valid[i]], dtype=np.int64)
    if not len(train_ids):
        raise CaptionsError("no training image has features (all were unreadable at extraction): nothing to "
                            "retrieve captions from", cache.path)
    pooled = torch.from_numpy(cache.pooled[:].astype(np.float32))
    pooled = torch.nn.functional.normalize(pooled, dim=1)
    train_feats = pooled[torch.from_numpy(train_ids)]
    train_caps = [ds.images[i]["tokens"] for i in train_ids]
    doc_freq = document_frequencies(train_caps)  # one document per image, as CIDEr does
    vec_cache: dict[int, list[dict]] = {}
    out: dict[int, str] = {}
    for s in range(0, len(query_ids), batch):
        q = query_ids[s : s + batch]
        sims = pooled[torch.from_numpy(q)] @ train_feats.T
        if split == "train":  # never retrieve the query itself
            sims[torch.arange(len(q)), torch.searchsorted(torch.from_numpy(train_ids), torch.from_numpy(q))] = -2
        top = sims.topk(min(k, len(train_ids)), dim=1).indices.numpy()
        for qid, neighbours in zip(q.tolist(), top, strict=True):
            cands, vecs = [], []
            for t in neighbours.tolist():
                if t not in vec_cache:
                    vec_cache[t] = tfidf_vectors(train_caps[t], doc_freq, len(train_caps))
                cands += train_caps[t]
                vecs += vec_cache[t]
            out[qid] = " ".join(cands[consensus(vecs)])
    return out


def evaluate_nn(data_dir: str | os.PathLike, features: str | os.PathLike, split: str = "val", k: int = 10,
                out: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run the retrieval baseline on ``split`` and score it as ``captions evaluate`` scores a decoder.

    Writes ``out/predictions.json`` and ``out/metrics.json`` (``out`` defaults to
    ``<features dir>/baseline-nn-k<k>-<split>``); returns the metrics record (model ``nn``, k,
    metrics, ...). Raises ``CaptionsError`` for an empty split, one whose images all lack
    features, or one without training images to retrieve from.
    """
    from captions.evaluation import score_and_write, with_features

    if k < 1:
        raise CaptionsError(f"k must be at least 1, got {k}")
    ds = load_prepared(data_dir)
    ids = ds.require_split(split)
    out_dir = Path(out) if out is not None else Path(features).parent / f"baseline-nn-k{k}-{split}"
    t0 = time.perf_counter()
    with FeatureCache(features) as cache:
        cache.check_dataset(ds.dataset_hash, what=str(data_dir))
        with_features(ids, cache, split)  # refuses a split without features, warns about a part
        preds = nn_captions(ds, cache, split, k)
    record = {"model": "nn", "k": k, "data": str(data_dir), "features": str(features), "split": split,
              "decode_seconds": round(time.perf_counter() - t0, 3)}
    return score_and_write(ds, preds, split, out_dir, record)
