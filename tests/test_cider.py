import pytest

from captions.cider import CiderD
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
