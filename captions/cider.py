"""CIDEr-D in pure Python, scoring one caption at a time against fixed references.

The corpus metric comes from pycocoevalcap (``captions.metrics``); this is the same formula
(1- to 4-grams, TF-IDF with document frequencies over images, clipped counts, Gaussian length
penalty with sigma 6, x10) for when captions must be scored one by one against a corpus whose
document frequencies are fixed: the rewards of self-critical training. The retrieval baseline
uses its n-gram counts, document frequencies and TF-IDF weighting (``tfidf``).

Reference: Vedantam, Zitnick and Parikh, "CIDEr: Consensus-based Image Description Evaluation",
CVPR 2015; the formula as pycocoevalcap's ``cider_scorer.py`` computes it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

NGRAMS = 4
SIGMA = 6.0

Ngram = tuple[str, ...]


def ngram_counts(tokens: Sequence[str]) -> Counter:
    """Counts of the 1- to 4-grams (tuples) of a tokenized caption."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, NGRAMS + 1) for i in range(len(tokens) - n + 1))


def document_frequencies(corpus: Iterable[Sequence[Sequence[str]]]) -> Counter:
    """n-gram -> number of documents (an image's references) that contain it."""
    df: Counter = Counter()
    for captions in corpus:
        df.update({g for toks in captions for g in ngram_counts(toks)})
    return df


def tfidf(counts: Mapping[Ngram, int], doc_freq: Mapping[Ngram, float], n_docs: int) -> dict[Ngram, float]:
    """TF-IDF weights of one caption's n-grams, as CIDEr-D computes them.

    ``counts``: n-gram (tuple of tokens) -> count in the caption (``ngram_counts``); ``doc_freq``:
    n-gram -> number of documents containing it (``document_frequencies``; missing means 0);
    ``n_docs``: number of documents. The weight of n-gram g with count c is
    ``c * (log(max(1, n_docs)) - log(max(1, df(g))))`` (natural log; an n-gram seen in no document
    weighs like one seen in one): Vedantam et al. 2015, written as pycocoevalcap's
    ``cider_scorer.counts2vec`` writes it (a difference of logs, not the log of a ratio, which can
    differ in the last bit; ``CiderD``'s scores depend on this expression exactly). Returns a new
    dict of floats in the order of ``counts``, not normalised.
    """
    log_docs = math.log(max(n_docs, 1))
    return {g: c * (log_docs - math.log(max(1.0, doc_freq.get(g, 0.0)))) for g, c in counts.items()}


Vector = tuple[list[dict[Ngram, float]], list[float], int]


class CiderD:
    """CIDEr-D of candidates against per-image references (tokenized), document frequencies
    from those references. ``score(image, tokens)`` matches pycocoevalcap's Cider of that one
    caption when the corpus is the same (tested)."""

    def __init__(self, references: dict[int, list[list[str]]]) -> None:
        self.df = document_frequencies(references.values())
        self.n_docs = len(references)
        self.refs = {i: [self.vector(t) for t in caps] for i, caps in references.items()}

    def vector(self, tokens: Sequence[str]) -> Vector:
        """TF-IDF vectors per n-gram order, their norms, and the length CIDEr-D compares
        (the number of bigrams, as pycocoevalcap counts it)."""
        vec: list[dict[Ngram, float]] = [{} for _ in range(NGRAMS)]
        sq = [0.0] * NGRAMS
        length = 0
        counts = ngram_counts(tokens)
        for g, w in tfidf(counts, self.df, self.n_docs).items():
            n = len(g) - 1
            vec[n][g] = w
            sq[n] += w * w
            if n == 1:
                length += counts[g]
        return vec, [math.sqrt(x) for x in sq], length

    def score(self, image_id: int, tokens: Sequence[str]) -> float:
        """CIDEr-D of one tokenized caption of image ``image_id``."""
        hyp, hyp_norm, hyp_len = self.vector(tokens)
        refs = self.refs[image_id]
        total = 0.0
        for ref, ref_norm, ref_len in refs:
            sims = 0.0
            for n in range(NGRAMS):
                if hyp_norm[n] and ref_norm[n]:
                    r = ref[n]
                    dot = sum(min(w, r[g]) * r[g] for g, w in hyp[n].items() if g in r)
                    sims += dot / (hyp_norm[n] * ref_norm[n])
            total += sims / NGRAMS * math.exp(-((hyp_len - ref_len) ** 2) / (2 * SIGMA**2))
        return 10.0 * total / max(len(refs), 1)
