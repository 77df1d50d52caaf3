import math

import pytest

from captions.cider import CiderD, ngram_counts, tfidf
from captions.metrics import per_image_cider, score_captions

REFS = {0: ["a red car on the road", "a car parked on a road", "red car near trees"],
        1: ["a blue boat on the water", "a boat on a lake", "small blue boat"],
        2: ["two dogs play in the grass", "dogs running on grass", "two brown dogs outside"],
        3: ["a plate of food on a table", "food on a white plate", "a meal on the table"]}


def test_one_caption_cider_d_matches_pycocoevalcap():
    """The self-critical reward is the evaluation metric: scored one caption at a time against the
    same corpus, its mean equals pycocoevalcap's corpus CIDEr."""
    preds = {0: "a red car on a road", 1: "a boat on the water water", 2: "a dog on the grass", 3: "a car"}
    cider = CiderD({i: [r.split() for r in rs] for i, rs in REFS.items()})
    mine = sum(cider.score(i, p.split()) for i, p in preds.items()) / len(preds)
    assert mine == pytest.approx(score_captions(REFS, preds, metrics=("cider",))["CIDEr"], rel=1e-9)
    assert cider.score(0, "a red car on the road".split()) > cider.score(0, "a red car on the".split())


def test_per_image_cider_is_keyed_by_image_and_averages_to_the_corpus_score():
    preds = {3: "a meal on a plate", 0: "a red car on the road", 2: "a boat", 1: "a blue boat on the water"}
    per = per_image_cider(REFS, preds)
    assert per[0] > per[3] > per[2]  # the exact reference beats a near one, which beats a wrong one
    assert sum(per.values()) / len(per) == pytest.approx(score_captions(REFS, preds, metrics=("cider",))["CIDEr"])


def test_baseline_tfidf_and_cider_d_use_the_same_weights():
    from captions.baseline import tfidf_vectors

    refs = {i: [r.split() for r in rs] for i, rs in REFS.items()}
    cider = CiderD(refs)
    captions = [*(t for ts in refs.values() for t in ts), "a red boat on the grass".split(), "zebra".split()]
    baseline = tfidf_vectors(captions, cider.df, len(refs))
    for toks, unit in zip(captions, baseline, strict=True):
        weights = tfidf(ngram_counts(toks), cider.df, len(refs))
        by_order, norms, _ = cider.vector(toks)
        assert {g: w for order in by_order for g, w in order.items()} == weights  # exactly CiderD's weights
        norm = math.sqrt(sum(w * w for w in weights.values())) or 1.0
        assert unit == {g: w / norm for g, w in weights.items()}  # the baseline: the same, unit length
    # an n-gram in every document weighs 0, one in no document weighs like one in one
    assert tfidf({("a",): 2, ("zebra",): 1}, {("a",): 4}, 4) == {("a",): 0.0, ("zebra",): pytest.approx(1.3862943611)}
