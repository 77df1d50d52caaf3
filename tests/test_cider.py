import pytest

from captions.cider import CiderD
from captions.metrics import score_captions


def test_one_caption_cider_d_matches_pycocoevalcap():
    """The self-critical reward is the evaluation metric: scored one caption at a time against the
    same corpus, its mean equals pycocoevalcap's corpus CIDEr."""
    refs = {0: ["a red car on the road", "a car parked on a road", "red car near trees"],
            1: ["a blue boat on the water", "a boat on a lake", "small blue boat"],
            2: ["two dogs play in the grass", "dogs running on grass", "two brown dogs outside"],
            3: ["a plate of food on a table", "food on a white plate", "a meal on the table"]}
    preds = {0: "a red car on a road", 1: "a boat on the water water", 2: "a dog on the grass", 3: "a car"}
    cider = CiderD({i: [r.split() for r in rs] for i, rs in refs.items()})
    mine = sum(cider.score(i, p.split()) for i, p in preds.items()) / len(preds)
    assert mine == pytest.approx(score_captions(refs, preds, metrics=("cider",))["CIDEr"], rel=1e-9)
    assert cider.score(0, "a red car on the road".split()) > cider.score(0, "a red car on the".split())
