import json

import numpy as np
from PIL import Image

from captions.data.synthetic import COLOURS, SHAPES, generate_synthetic
from captions.pipeline.prepare import prepare_synthetic
from captions.pipeline.prepared import load_prepared


def test_generator_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", 6, 2, 2, seed=3)
    b = generate_synthetic(tmp_path / "b", 6, 2, 2, seed=3)
    for pa, pb in zip(a, b, strict=True):
        assert json.loads(pa.read_text())["annotations"] == json.loads(pb.read_text())["annotations"]
    assert (tmp_path / "a/train/00000001.jpg").read_bytes() == (tmp_path / "b/train/00000001.jpg").read_bytes()
    c = generate_synthetic(tmp_path / "c", 6, 2, 2, seed=4)
    assert json.loads(c[0].read_text()) != json.loads(a[0].read_text())


def test_captions_describe_what_is_drawn(tmp_path):
    """Every caption names the drawn shape's colour, and the drawn pixels really have that colour."""
    (train, *_) = generate_synthetic(tmp_path, 12, 0, 0, seed=1)
    doc = json.loads(train.read_text())
    by_image = {}
    for ann in doc["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["caption"])
    palette = np.array(list(COLOURS.values()), dtype=float)
    for info in doc["images"]:
        caps = by_image[info["id"]]
        assert len(caps) == 5 and len(set(caps)) >= 4  # differently worded
        colours = {w for c in caps for w in c.split() if w in COLOURS}
        shapes = {w for c in caps for w in c.split() if w in SHAPES}
        assert len(colours) == 1 and len(shapes) == 1
        arr = np.asarray(Image.open(tmp_path / "train" / info["file_name"]), dtype=float).reshape(-1, 3)
        saturated = arr[(arr.max(1) - arr.min(1)) > 80]  # the background is grey
        nearest = np.argmin(((palette[None] - saturated.mean(0)) ** 2).sum(-1))
        assert list(COLOURS)[nearest] == colours.pop()


def test_prepare_synthetic_goes_through_the_coco_parser(tmp_path):
    m = prepare_synthetic(tmp_path / "syn", 20, 5, 5, workers=1, progress=False)
    assert m["source_format"] == "coco"
    assert m["counts"]["train"] == {"images": 20, "captions": 100}
    ds = load_prepared(tmp_path / "syn")
    assert {"circle", "square", "triangle"} & set(ds.vocab.token_to_idx)
