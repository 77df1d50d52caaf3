import json
import subprocess
import sys

import pytest

from captions.errors import CaptionsError
from captions.features.spec import FeatureSpec

PREP = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear"}


def make_spec(**change) -> FeatureSpec:
    fields = dict(backbone="resnet18", weights="random", image_size=224, preprocessing=PREP, dtype="float16",
                  precision="fp32", spatial_shape=(7, 7), channels=512, dataset_hash="ab" * 32)
    return FeatureSpec(**{**fields, **change})


def test_dict_round_trip_is_json_like():
    spec = make_spec()
    d = spec.to_dict()
    assert d["spatial_shape"] == [7, 7] and d["token_layout"] == "grid"
    assert json.loads(json.dumps(d)) == d
    assert FeatureSpec.from_dict(d) == spec


def test_attrs_round_trip():
    spec = make_spec(preprocessing={**PREP, "mean": (0.485, 0.456, 0.406)})  # a tuple, as Preprocessing has
    attrs = spec.to_attrs()
    assert isinstance(attrs["preprocessing"], str) and json.loads(attrs["preprocessing"]) == PREP
    assert attrs["spatial_shape"] == [7, 7] and attrs["token_layout"] == "grid"
    assert FeatureSpec.from_attrs(attrs) == spec
    # read_attrs() output: preprocessing decoded, plus attributes that are not the spec's
    read = {**attrs, "preprocessing": PREP, "format": "captions-features", "chunk_rows": 256, "complete": True}
    assert FeatureSpec.from_attrs(read) == spec
    assert "dataset_hash" not in make_spec(dataset_hash=None).to_attrs()  # HDF5 has no null


def test_old_checkpoint_and_cache_records_are_read():
    old = {"backbone": "resnet18", "weights": "random", "image_size": 224, "preprocessing": PREP,
           "dtype": "float16", "spatial_shape": [7, 7], "channels": 512, "dataset_hash": "ab" * 32,
           "precision": "fp32"}  # a checkpoint's "features" before token_layout existed
    assert FeatureSpec.from_dict(old) == make_spec()
    older = {k: v for k, v in old.items() if k not in ("precision", "dataset_hash")}
    spec = FeatureSpec.from_dict({**older, "precision": None, "unknown": 1})
    assert (spec.precision, spec.dataset_hash, spec.token_layout) == ("auto", None, "grid")


def test_missing_required_keys_are_named():
    d = make_spec().to_dict()
    del d["channels"], d["weights"]
    with pytest.raises(CaptionsError, match=r"^ckpt.pt: features record no weights, channels$"):
        FeatureSpec.from_dict(d, path="ckpt.pt")
    with pytest.raises(CaptionsError, match="no image_size"):
        FeatureSpec.from_dict({**make_spec().to_dict(), "image_size": None})


def test_mismatches_wording_and_keys():
    a, b = make_spec(), make_spec(image_size=256, spatial_shape=(8, 8), dtype="float32")
    assert a.mismatches(b) == ["image_size 224 vs 256", "spatial_shape 7x7 vs 8x8"]  # dtype: not a decoder key
    assert a.mismatches(b, FeatureSpec.EXTRACTION_KEYS) == ["image_size 224 vs 256", "dtype float16 vs float32"]
    assert a.mismatches(a) == []
    with pytest.raises(CaptionsError, match=r"^c\.h5: other features \(image_size 224 vs 256; spatial_shape 7x7 "
                                            r"vs 8x8\)$"):
        a.require_compatible(b, what="other features", path="c.h5")
    a.require_compatible(make_spec(dtype="float32", precision="bf16"), what="never raised")


def test_tuples_and_lists_compare_equal():
    a = make_spec(spatial_shape=[7, 7], preprocessing={**PREP, "std": (0.229, 0.224, 0.225)})
    assert a == make_spec() and a.spatial_shape == (7, 7)
    assert a.mismatches(make_spec(), ("spatial_shape", "preprocessing")) == []


def test_spec_imports_no_numpy_torch_or_h5py():
    code = ("import sys, captions.features.spec; "
            "print([m for m in ('numpy', 'torch', 'h5py') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
