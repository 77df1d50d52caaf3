"""Format tests on the real files in ../shared/data (skipped with a reason when ../shared is absent)."""

from collections import Counter

import pytest

from captions.data import read_coco, read_csv_table, read_flickr8k, read_karpathy
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.prepared import load_prepared
from captions.pipeline.tokenize import simple_tokenize

pytestmark = pytest.mark.shared


def test_flickr8k_token_file_with_official_split_lists(shared):
    recs = read_flickr8k([shared / "data/flickr8k-text/Flickr8k.token.txt"], None)
    assert sum(len(r.captions) for r in recs) == 40460
    assert Counter(r.split for r in recs) == {"train": 6000, "val": 1000, "test": 1000, "": len(recs) - 8000}
    assert all(len(r.captions) == 5 for r in recs if r.split)
    assert recs[0].path.name == recs[0].name


def test_flickr8k_karpathy_json(shared):
    recs = read_karpathy([shared / "data/flickr8k-text/dataset_flickr8k.json"], None)
    assert Counter(r.split for r in recs) == {"train": 6000, "val": 1000, "test": 1000}


def test_ucm_karpathy_json_splits_and_paths(shared):
    recs = read_karpathy([shared / "data/ucm/dataset_ucm.json"], None)
    assert Counter(r.split for r in recs) == {"train": 2252, "val": 278}
    assert all(r.path.exists() for r in recs[:50])


def test_viic_vietnamese_csv(shared):
    recs = read_csv_table(shared / "data/viic/captions.csv", None)
    assert Counter(r.split for r in recs) == {"train": 2334, "val": 299}
    words = {w for r in recs[:200] for c in r.captions for w in simple_tokenize(c)}
    assert {"người", "đang"} <= words


def test_coco_mini_prepares_end_to_end(shared, tmp_path):
    src = shared / "data/coco-mini/annotations/captions_train2017.json"
    assert len(read_coco([src], None)) == 80
    m = prepare("coco", [src], tmp_path / "coco", options=PrepareOptions(image_size=64), progress=False)
    assert m["counts"]["train"] == {"images": 80, "captions": 400}
    assert m["skipped_count"] == 0
    assert load_prepared(tmp_path / "coco").vocab.token_to_idx["<UNK>"] == 3
